"""resnet_jax.training.run_setup: the recipes' length, schedule, EMA decay and transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resnet_jax.runtime.errors import UserError
from resnet_jax.training import run_setup
from resnet_jax.training.config import TrainConfig, recipe_config, resolve


def test_max_steps_cuts_the_last_epoch():
    config = resolve(recipe_config("cifar-paper", arch="resnet18"))
    length = run_setup.run_length(config, 390)  # 50,000 CIFAR images in batches of 128
    assert (length.epochs, length.total_steps, length.warmup_steps) == (165, 64000, 0)
    assert length.steps_in(1) == 390 and length.steps_in(165) == 40
    schedule = run_setup.run_schedule(config, length)
    lrs = [float(schedule(s)) for s in (0, 31999, 32000, 47999, 48000, 63999)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert run_setup.train_transform(config).crop == "pad_crop"


def test_the_deep_cifar_models_warm_up_at_a_tenth():
    config = recipe_config("cifar-paper", arch="resnet110")  # resnet110: the CIFAR family
    schedule = run_setup.run_schedule(config, run_setup.run_length(config, 390))
    lrs = [float(schedule(s)) for s in (0, 399, 400, 32000)]
    assert lrs == pytest.approx([0.01, 0.01, 0.1, 0.01])


def test_the_v2_recipe_schedule_equals_torchvisions_at_each_epoch_start():
    """torchvision steps its SequentialLR(LinearLR(0.01, 5 epochs), CosineAnnealingLR(595))
    once per epoch; ours, per step, gives the same learning rate at each epoch's first step."""
    config = resolve(recipe_config("torchvision-v2"))
    length = run_setup.run_length(config, 10)
    schedule = run_setup.run_schedule(config, length)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    s = torch.optim.lr_scheduler
    scheduler = s.SequentialLR(
        opt, [s.LinearLR(opt, 0.01, total_iters=5), s.CosineAnnealingLR(opt, 595)], milestones=[5]
    )
    theirs = []
    for _ in range(600):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    ours = [float(schedule(epoch * 10)) for epoch in range(600)]
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-7)


def test_the_v2_recipe_step_options():
    config = resolve(recipe_config("torchvision-v2"))
    options = run_setup.step_options(config, run_setup.run_length(config, 1251))
    assert options.ema.decay == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert (options.ema.every, options.ema.warmup, options.ema.lr_warmup_steps) == (
        32, "lr", 5 * 1251,
    )  # fmt: skip
    augment = options.augment
    assert (augment.mixup_alpha, augment.cutmix_alpha, augment.erase_prob) == (0.2, 1.0, 0.1)
    assert options.label_smoothing == 0.1 and options.accumulate_steps == 1
    transform = run_setup.train_transform(config)
    assert (transform.crop, transform.auto_augment) == ("random_resized", "ta_wide")
    plain = run_setup.step_options(resolve(TrainConfig()), run_setup.run_length(TrainConfig(), 5))
    assert plain.ema is None and not plain.augment.mixes and plain.augment.erase_prob == 0


def test_milestones_in_epochs_and_a_warmup_too_long_for_the_cosine():
    config = resolve(TrainConfig(schedule="multistep", lr_milestones=(2, 3), lr=1.0))
    schedule = run_setup.run_schedule(config, run_setup.run_length(config, 5))
    assert [float(schedule(s)) for s in (9, 10, 15)] == pytest.approx([1.0, 0.1, 0.01])
    too_long = resolve(TrainConfig(schedule="cosine", warmup_steps=30, epochs=2))
    with pytest.raises(UserError, match="leaves none of the 10 steps for the cosine"):
        run_setup.run_length(too_long, 5)
