"""resnet_jax.training.optim: optimizers against torch.optim, schedules, frozen-stage labels."""

from __future__ import annotations

import jax
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
        (
            "sgd-nesterov",
            lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=0.1, nesterov=True),
        ),
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
        UserError, match="Unknown --schedule 'poly'; choose one of: constant, cosine, step"
    ):
        optim.make_schedule(0.1, "poly", 0, 10)


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


def torch_lrs(make_scheduler, steps: int, lr: float = 0.1) -> list[float]:
    """The learning rate of each of `steps` optimizer steps under a torch scheduler stepped once
    per optimizer step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


S = torch.optim.lr_scheduler


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ({"schedule": "step", "step_size": 3, "gamma": 0.5}, lambda o: S.StepLR(o, 3, 0.5)),
        (
            {"schedule": "multistep", "milestones": (4, 7), "gamma": 0.1},
            lambda o: S.MultiStepLR(o, [4, 7], 0.1),
        ),
        (  # the ResNet paper's resnet110 recipe: lr/10 for the first steps, then milestones
            {"schedule": "multistep", "milestones": (6, 9), "warmup_steps": 4,
             "warmup_method": "constant", "warmup_factor": 0.1},
            lambda o: S.ChainedScheduler(
                [S.ConstantLR(o, factor=0.1, total_iters=4), S.MultiStepLR(o, [6, 9], 0.1)]
            ),
        ),
        (
            {"schedule": "step", "step_size": 4, "gamma": 0.5, "warmup_steps": 3,
             "warmup_factor": 0.01},
            lambda o: S.ChainedScheduler(
                [S.LinearLR(o, start_factor=0.01, total_iters=3), S.StepLR(o, 4, 0.5)]
            ),
        ),
        (  # torchvision's recipes: a linear warm-up from lr/100, then the cosine
            {"schedule": "cosine", "warmup_steps": 3, "warmup_factor": 0.01},
            lambda o: S.SequentialLR(
                o,
                [S.LinearLR(o, start_factor=0.01, total_iters=3), S.CosineAnnealingLR(o, 9)],
                milestones=[3],
            ),
        ),
        ({"schedule": "cosine"}, lambda o: S.CosineAnnealingLR(o, 12)),
    ],
)  # fmt: skip
def test_schedules_match_torch_schedulers_stepped_per_step(ours, theirs):
    options = {"warmup_steps": 0, **ours}
    schedule = optim.make_schedule(0.1, total_steps=12, **options)
    got = [float(schedule(step)) for step in range(12)]
    np.testing.assert_allclose(got, torch_lrs(theirs, 12), rtol=1e-6, atol=1e-9)


def test_weight_decay_groups_are_torchvisions(tmp_path):
    """--norm-weight-decay takes the parameters of torchvision's `split_normalization_params`
    (BatchNorm's weight and bias), --bias-weight-decay every bias, and wins over it (as
    torchvision's `set_weight_decay` checks its custom keys first)."""
    import torchvision
    from torchvision.ops._utils import split_normalization_params

    from resnet_jax.models.factory import create_model, init_variables
    from resnet_jax.weights.torch_names import torch_to_flax

    model = torchvision.models.resnet18(num_classes=3)
    norm = {id(p) for p in split_normalization_params(model)[0]}
    codes = {"trained": 0, "norm": 1, "bias": 2}
    names = dict(enumerate(codes))

    def expected(split_bias: bool) -> dict:
        group = {
            name: "bias" if split_bias and name.endswith(".bias")
            else "norm" if id(p) in norm else "trained"
            for name, p in model.named_parameters()
        }  # fmt: skip
        arrays = {n: np.full(p.shape, codes[group[n]]) for n, p in model.named_parameters()}
        flax = torch_to_flax(arrays)["params"]
        return jax.tree.map(lambda a: names[int(a.flat[0])], flax)

    params = init_variables(create_model("resnet18", num_classes=3))["params"]
    for split_bias in (False, True):
        got = optim.param_labels(params, -1, split_norm=True, split_bias=split_bias)
        assert got == expected(split_bias)
    assert set(jax.tree.leaves(optim.param_labels(params, -1))) == {"trained"}


def test_grouped_weight_decay_matches_torch_param_groups():
    rng = np.random.default_rng(1)
    shapes = {"conv1": {"kernel": (3, 3, 2, 4)}, "bn1": {"scale": (4,), "bias": (4,)},
              "fc": {"kernel": (4, 3), "bias": (3,)}}  # fmt: skip
    params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))  # fmt: skip
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
             for _ in range(3)]  # fmt: skip
    tx = optim.make_optimizer("sgd-nesterov", 0.05, 0.1, norm_weight_decay=0.0,
                              bias_weight_decay=0.5)  # fmt: skip
    weights = {f"{m}.{n}": torch.nn.Parameter(torch.tensor(v)) for m, leaves in params.items()
               for n, v in leaves.items()}  # fmt: skip
    groups = [
        {"params": [weights["conv1.kernel"], weights["fc.kernel"]], "weight_decay": 0.1},
        {"params": [weights["bn1.scale"]], "weight_decay": 0.0},
        {"params": [weights["bn1.bias"], weights["fc.bias"]], "weight_decay": 0.5},
    ]
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        for m, leaves in g.items():
            for n, v in leaves.items():
                weights[f"{m}.{n}"].grad = torch.tensor(v)
        opt.step()
    for m, leaves in params.items():
        for n, v in leaves.items():
            want = weights[f"{m}.{n}"].detach().numpy()
            np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-6, err_msg=f"{m}/{n}")
