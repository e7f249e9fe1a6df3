"""resnet_jax.training.config and the train.py parser made from it: every flag once, checked before work."""

from __future__ import annotations

import dataclasses

import pytest

from resnet_jax.cli.train import parse_args
from resnet_jax.runtime.errors import UserError
from resnet_jax.training.config import RUN_KEYS, TrainConfig, recipe_config, resolve
from resnet_jax.training.recipes import RECIPES


def test_every_field_is_a_flag_with_its_default_and_help():
    assert parse_args([]) == TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["help"], field.name
    config = parse_args(["--freeze", "layer2", "--lr", "0.5", "--resume", "--synthetic"])
    assert (config.freeze, config.lr, config.resume, config.synthetic) == ("layer2", 0.5, True, 50)
    assert "seed" in RUN_KEYS and "epochs" not in RUN_KEYS and "resume" not in RUN_KEYS


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "0"], "--image-size 0 is not allowed"),
        (["--image-size", "-5"], "--image-size -5 is not allowed"),
        (["--epochs", "0"], "--epochs 0 is not allowed"),
        (["--workers", "-1"], "--workers -1 is not allowed"),
        (["--lr", "-0.1"], "--lr -0.1 is not allowed"),
        (["--warmup-epochs", "nan", "--schedule", "cosine"], "--warmup-epochs nan is not allowed"),
        (["--batch-size", "0"], "--batch-size 0 is not allowed"),
        (["--arch", "resnet19"], "Unknown architecture 'resnet19'"),
        (["--schedule", "cosine", "--warmup-epochs", "3"], "leaves no epoch for the cosine"),
    ],
)
def test_bad_values_are_one_line_before_any_work(flags, message):
    with pytest.raises(UserError, match=message):
        resolve(parse_args(flags))


def test_choices_come_from_the_registries():
    with pytest.raises(SystemExit):
        parse_args(["--optimizer", "lamb"])
    with pytest.raises(UserError, match="Unknown --freeze 'layer9'; choose one of: none, layer1"):
        resolve(TrainConfig(freeze="layer9"))  # the library checks what the parser would
    assert parse_args(["--head", "append"]).head == "append" and TrainConfig().head == "replace"
    assert "head" in RUN_KEYS
    with pytest.raises(UserError, match="Unknown --head 'prepend'; choose one of: replace, append"):
        resolve(TrainConfig(head="prepend"))


def test_recipes_set_defaults_that_explicit_flags_override():
    v2 = parse_args(["--recipe", "torchvision-v2"])
    assert v2 == recipe_config("torchvision-v2")
    assert (v2.lr, v2.batch_size, v2.epochs, v2.image_size, v2.eval_resize, v2.eval_crop) == (
        0.5, 1024, 600, 176, 232, 224,
    )  # fmt: skip
    assert (v2.model_ema, v2.model_ema_steps, v2.model_ema_decay, v2.ra_reps) == (
        True, 32, 0.99998, 4,
    )  # fmt: skip
    # --epochs 3 is the default of a plain run, but given explicitly it beats the recipe's 600.
    mine = parse_args(["--recipe", "torchvision-v2", "--epochs", "3", "--train-crop", "160"])
    assert (mine.epochs, mine.image_size, mine.lr) == (3, 160, 0.5)
    assert mine == recipe_config("torchvision-v2", epochs=3, image_size=160)


def test_the_cifar_recipe_warms_up_only_the_deepest_models():
    shallow = resolve(parse_args(["--recipe", "cifar-paper", "--arch", "resnet18"]))
    assert (shallow.dataset, shallow.lr_milestones, shallow.max_steps) == (
        "cifar10", (32000, 48000), 64000,
    )  # fmt: skip
    assert (shallow.eval_resize, shallow.eval_crop, shallow.train_crop_mode) == (32, 32, "pad_crop")
    assert shallow.warmup_steps == 0
    deep = RECIPES["cifar-paper"].values("resnet110")
    assert (deep["warmup_steps"], deep["warmup_method"], deep["warmup_factor"]) == (
        400, "constant", 0.1,
    )  # fmt: skip


def test_the_eval_transform_defaults_to_the_train_crop():
    config = resolve(TrainConfig(image_size=176))
    assert (config.eval_crop, config.eval_resize) == (176, 201)  # 256/224 of 176
    assert resolve(TrainConfig(eval_crop=224)).eval_resize == 256


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--schedule", "step"], "--schedule step needs --lr-step-size"),
        (["--schedule", "multistep"], "needs increasing --lr-milestones"),
        (["--schedule", "multistep", "--lr-milestones", "9", "3"], "needs increasing"),
        (["--lr-milestones", "0"], "--lr-milestones 0 is not allowed"),
        (["--random-erase", "1.5"], "--random-erase 1.5 is not allowed; give a number of at most"),
        (["--warmup-epochs", "1", "--warmup-steps", "5"], "not both"),
        (["--model-ema-warmup", "slow"], None),
        (["--accumulate-steps", "0"], "--accumulate-steps 0 is not allowed"),
    ],
)
def test_bad_recipe_values_are_one_line(flags, message):
    if message is None:
        with pytest.raises(SystemExit):  # argparse's choices
            parse_args(flags)
        return
    with pytest.raises(UserError, match=message):
        resolve(parse_args(flags))
