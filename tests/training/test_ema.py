"""resnet_jax.training.ema: torchvision's reference EMA (an AveragedModel over parameters and
buffers, reset during the warm-up), timm's warm-up formula, the decay adjustment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from resnet_jax.runtime.errors import UserError
from resnet_jax.training import ema


def small_torch_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
    ).double()  # fmt: skip


def weights_of(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Parameters and running statistics (num_batches_tracked is no weight)."""
    return {
        k: v.detach().numpy().copy()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


@pytest.mark.parametrize("every, warmup_epochs", [(1, 0), (3, 2)])
def test_matches_torchvisions_reference_ema(every, warmup_epochs):
    """torchvision's references/classification: `ExponentialMovingAverage` is an
    `AveragedModel(use_buffers=True)` with `decay * avg + (1 - decay) * weight`, updated after
    the optimizer step when `i % model_ema_steps == 0` (i counts the batches of each epoch),
    its `n_averaged` reset to 0 after each update in the warm-up epochs."""
    decay, epochs, steps_per_epoch = 0.8, 4, 5
    model = small_torch_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def average(avg, weight, n):
        return decay * avg + (1 - decay) * weight

    theirs = torch.optim.swa_utils.AveragedModel(model, avg_fn=average, use_buffers=True)
    schedule = ema.EmaSchedule(decay, every, "lr", warmup_epochs * steps_per_epoch, steps_per_epoch)
    rng = np.random.default_rng(0)
    maybe_update = jax.jit(ema.maybe_update, static_argnums=3)
    with jax.enable_x64(True):
        ours, step = weights_of(model), 0
        for epoch in range(epochs):
            for i in range(steps_per_epoch):
                x = torch.tensor(rng.normal(size=(4, 3, 6, 6)))
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
                step += 1
                if i % every == 0:
                    theirs.update_parameters(model)
                    if epoch < warmup_epochs:
                        theirs.n_averaged.fill_(0)
                ours = maybe_update(ours, weights_of(model), step, schedule)
            want = weights_of(theirs.module)
            for name, value in ours.items():
                assert value.dtype == jnp.float64
                np.testing.assert_allclose(value, want[name], rtol=1e-12, err_msg=name)
    # The average is not the weights themselves (it would be with every update a copy).
    assert any(not np.allclose(ours[k], v) for k, v in weights_of(model).items())


def test_update_counts_and_copies():
    s = ema.EmaSchedule(0.9, every=2, warmup="lr", lr_warmup_steps=5, steps_per_epoch=5)
    steps = np.arange(1, 16)
    # Updates after steps 1, 3, 5 of each epoch of 5 steps.
    assert [int(t) for t in steps if s.is_update(t)] == [1, 3, 5, 6, 8, 10, 11, 13, 15]
    assert [int(s.updates(t)) for t in (0, 1, 2, 5, 6, 10, 11)] == [0, 1, 1, 3, 4, 6, 7]
    # The updates in the warm-up (steps 1-5) and the first after it (step 6) copy.
    decays = [float(s.decay_at(t)) for t in steps if s.is_update(t)]
    assert decays == pytest.approx([0, 0, 0, 0, 0.9, 0.9, 0.9, 0.9, 0.9])
    plain = ema.EmaSchedule(0.9, every=4)
    assert [int(t) for t in steps if plain.is_update(t)] == [1, 5, 9, 13]
    assert [float(plain.decay_at(t)) for t in (1, 5, 9)] == pytest.approx([0, 0.9, 0.9])


def test_timm_warmup():
    """timm's ModelEmaV3.get_decay(step) with use_warmup, update_after_step 0, warmup_gamma 1,
    warmup_power 2/3, min_decay 0, as timm's train.py calls it (step = the number of updates,
    from 1): 0 for step 1, else min(decay, 1 - (1 + (step - 1)) ** (-2/3))."""

    def timm_decay(step: int, decay: float) -> float:
        step = max(0, step - 0 - 1)
        if step <= 0:
            return 0.0
        return max(min(1 - (1 + step / 1.0) ** (-2 / 3), decay), 0.0)

    s = ema.EmaSchedule(0.999, every=1, warmup="timm")
    got = [float(s.decay_at(t)) for t in range(1, 40000, 997)]
    want = [timm_decay(t, 0.999) for t in range(1, 40000, 997)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[-1] == pytest.approx(0.999)  # reached at 31.6k updates
    # Every 3 steps: the k-th update uses timm's decay of step k.
    s3 = ema.EmaSchedule(0.999, every=3, warmup="timm")
    assert [float(s3.decay_at(t)) for t in (1, 4, 7)] == pytest.approx(
        [timm_decay(k, 0.999) for k in (1, 2, 3)]
    )


def test_adjusted_decay_is_torchvisions():
    # torchvision's ResNet-50 V2 recipe: 8 GPUs x 128, EMA every 32 steps, 600 epochs.
    alpha = (1 - 0.99998) * 8 * 128 * 32 / 600
    assert ema.adjusted_decay(0.99998, 1024, 32, 600) == pytest.approx(1 - alpha, rel=1e-12)
    assert ema.adjusted_decay(0.9, 1024, 32, 1) == 0.0  # alpha capped at 1: a copy


def test_update_is_exact_at_the_ends_and_unknown_warmup_is_a_user_error():
    a = {"w": jnp.array([1.0, 2.0])}
    b = {"w": jnp.array([3.0, 7.0])}
    assert np.array_equal(ema.update(a, b, 0.0)["w"], b["w"])
    assert np.array_equal(ema.update(a, b, 1.0)["w"], a["w"])
    np.testing.assert_allclose(ema.update(a, b, 0.75)["w"], [1.5, 3.25])
    with pytest.raises(UserError, match="Unknown --model-ema-warmup 'slow'"):
        ema.EmaSchedule(0.9, warmup="slow")
