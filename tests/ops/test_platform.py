"""resnet_jax.ops.platform: the CPU path is chosen while tracing, leaving no cond in the graph."""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models.factory import create_model, init_variables
from resnet_jax.ops.platform import cpu_or_default, on_cpu


def test_the_cpu_branch_alone_is_traced():
    traced = []

    def branch(name, step):
        return lambda x: traced.append(name) or x + step

    out = cpu_or_default(branch("cpu", 1), branch("other", -1), 1.0)
    assert traced == (["cpu"] if on_cpu() else ["other"])
    assert out == (2.0 if on_cpu() else 0.0)


def test_a_train_steps_gradient_has_no_platform_cond():
    # lax.platform_dependent left a cond per convolution and BatchNorm, and autodiff linearized
    # and transposed both branches of each: half of a ResNet-50 train step's trace time.
    model = create_model("resnext50_32x4d", num_classes=3)  # dense, 1x1 and grouped convolutions
    variables = init_variables(model, image_size=32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])  # fmt: skip
        return logits.sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables["params"]))
    assert " cond[" not in jaxpr and "platform_index" not in jaxpr
