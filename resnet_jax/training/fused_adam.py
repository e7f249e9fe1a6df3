"""Adam and AdamW whose update runs as one call of the CPU extension (csrc/adam.cc).

optax's Adam is three elementwise passes per parameter array, and applying the update a fourth;
XLA:CPU compiles each as a loop of its own: with them a ResNet-34 train step is 567 fusions and
3.1-3.6 s of compilation, without them 273 and 1.9-2.3 s (benchmarks/adam.py). Here the
optimizer state, its layout in checkpoints and the arithmetic are optax's (`reference`; the
results agree but for the last bits, csrc/adam.cc says why); only the work on CPU float32 arrays
goes to one extension call. Elsewhere `reference` runs as is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from resnet_jax.ops import extension
from resnet_jax.ops.platform import on_cpu

__all__ = ["FusedAdam", "adam", "adamw", "apply_update", "fused_path"]

B1, B2, EPS = 0.9, 0.999, 1e-8  # optax's and torch's defaults


class FusedAdam(NamedTuple):
    """An optax GradientTransformation (init, update) that can also return the new parameters
    from the same call (`apply_update`), which saves the add per array of `optax.apply_updates`."""

    init: optax.TransformInitFn
    update: optax.TransformUpdateFn
    step: Callable[[Any, Any, Any], tuple[Any, Any]]  # (grads, state, params) -> (params, state)


def fused_path(leaves: list[Any]) -> bool:
    """Whether these arrays' update runs in the extension: on CPU, float32, extension built
    (RESNET_JAX_CONV=xla keeps everything on XLA's own operations)."""
    return (
        bool(leaves)
        and on_cpu()
        and all(jnp.result_type(a) == jnp.float32 for a in leaves)
        and extension.use_onednn(jnp.float32)
    )


def _is_counted(x: Any) -> bool:
    return isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))


def _fused(
    reference: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    decay: str,
) -> FusedAdam:
    """`reference` (optax's Adam or AdamW, default betas and eps) with a fused update."""
    decay_at = decay if weight_decay != 0.0 else None  # optax skips a zero decay

    def run(grads, state, params, apply: bool):
        leaves, treedef = jax.tree.flatten(grads)
        if params is None or not fused_path(leaves):
            return None
        (adam,) = [s for s in jax.tree.leaves(state, is_leaf=_is_counted)
                   if isinstance(s, optax.ScaleByAdamState)]  # fmt: skip
        count = optax.safe_increment(adam.count)
        # csrc/adam.cc's Scalars, rounded as optax's expressions round them (Python floats times
        # float32 arrays); XLA multiplies by the bias corrections' reciprocals where optax
        # divides. The schedule's own count always equals Adam's.
        lr = learning_rate(adam.count) if callable(learning_rate) else learning_rate
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        scalars = jnp.stack([
            f32(1 - B1), f32(B1), f32(1 - B2), f32(B2),
            1 / f32(1 - B1**count), 1 / f32(1 - B2**count),
            f32(EPS), f32(0.0), f32(-1 * lr), f32(weight_decay),  # 0.0: optax's eps_root
        ])  # fmt: skip
        out, mu, nu = extension.adam_update(
            scalars,
            leaves,
            treedef.flatten_up_to(adam.mu),
            treedef.flatten_up_to(adam.nu),
            treedef.flatten_up_to(params),
            decay_at,
            apply,
        )
        new_adam = optax.ScaleByAdamState(count, treedef.unflatten(mu), treedef.unflatten(nu))

        def advance(s):
            if isinstance(s, optax.ScaleByAdamState):
                return new_adam
            return s._replace(count=optax.safe_increment(s.count))  # the schedule's step

        return treedef.unflatten(out), jax.tree.map(advance, state, is_leaf=_is_counted)

    def update(grads, state, params=None):
        return run(grads, state, params, apply=False) or reference.update(grads, state, params)

    def step(grads, state, params):
        fused = run(grads, state, params, apply=True)
        if fused is not None:
            return fused
        updates, state = reference.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return FusedAdam(reference.init, update, step)


def adam(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0) -> FusedAdam:
    """torch.optim.Adam: the weight decay is added to the gradient (L2), as
    `optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))` does."""
    reference = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))
    return _fused(reference, learning_rate, weight_decay, "gradient")


def adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1e-4) -> FusedAdam:
    """torch.optim.AdamW: the weight decay is decoupled from the moments (`optax.adamw`)."""
    reference = optax.adamw(learning_rate, weight_decay=weight_decay)
    return _fused(reference, learning_rate, weight_decay, "update")


def apply_update(
    tx: optax.GradientTransformation, grads: Any, state: Any, params: Any
) -> tuple[Any, Any]:
    """(new params, new optimizer state): in one step where `tx` can (`FusedAdam`), else
    optax's update and `optax.apply_updates`."""
    if isinstance(tx, FusedAdam):
        return tx.step(grads, state, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
