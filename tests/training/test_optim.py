"""resnet_jax.training.optim: optimizers against torch.optim, schedules, frozen-stage labels."""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch

from resnet_jax.runtime.errors import UserError
from resnet_jax.training import optim


@pytest.mark.parametrize(
    "name, torch_opt",
    [
        ("adam", lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.1)),
    ],
)
def test_optimizers_match_torch(name, torch_opt):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(5,)).astype(np.float32)
    grads = rng.normal(size=(4, 5)).astype(np.float32)
    tx = optim.make_optimizer(name, 0.01, 0.1)
    params, opt_state = {"w": start}, tx.init({"w": start})
    weight = torch.nn.Parameter(torch.tensor(start))
    opt = torch_opt([weight])
    for g in grads:
        updates, opt_state = tx.update({"w": g}, opt_state, params)
        params = optax.apply_updates(params, updates)
        weight.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(params["w"], weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules():
    cosine = optim.make_schedule(0.1, "cosine", warmup_steps=10, total_steps=110)
    assert float(cosine(0)) == 0.0
    assert float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(60)) == pytest.approx(0.05, rel=1e-4)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-7)
    constant = optim.make_schedule(0.1, "constant", warmup_steps=4, total_steps=100)
    assert [round(float(constant(s)), 6) for s in (0, 2, 4, 50)] == [0.0, 0.05, 0.1, 0.1]
    assert float(optim.make_schedule(0.1, "constant", 0, 100)(0)) == pytest.approx(0.1)


def test_unknown_optimizer_and_schedule_are_user_errors():
    with pytest.raises(
        UserError, match="Unknown --optimizer 'lamb'; choose one of: adam, adamw, sgd"
    ):
        optim.make_optimizer("lamb", 0.1, 0.0)
    with pytest.raises(
        UserError, match="Unknown --schedule 'step'; choose one of: constant, cosine"
    ):
        optim.make_schedule(0.1, "step", 0, 10)


def test_param_labels_follow_freeze():
    params = {
        name: {"kernel": 0} for name in ("conv1", "bn1", "layer1_0", "layer2_1", "layer4_1", "fc")
    }
    labels = optim.param_labels(params, optim.FREEZE["layer2"])
    frozen = {name for name, leaf in labels.items() if leaf["kernel"] == "frozen"}
    assert frozen == {"conv1", "bn1", "layer1_0", "layer2_1"}
    labels = optim.param_labels(params, optim.frozen_stages("backbone"))
    assert {n for n, leaf in labels.items() if leaf["kernel"] == "trained"} == {"fc"}
    # --head append --freeze backbone: the pretrained fc is frozen too, the appended head trains.
    labels = optim.param_labels(
        {**params, "head": {"kernel": 0}}, optim.frozen_stages("backbone", "append")
    )
    assert {n for n, leaf in labels.items() if leaf["kernel"] == "trained"} == {"head"}
    assert optim.frozen_stages("layer2", "append") == optim.FREEZE["layer2"]
