"""resnet_jax.training.config and the train.py parser made from it: every flag once, checked before work."""

from __future__ import annotations

import dataclasses

import pytest

from resnet_jax.cli.train import parse_args
from resnet_jax.runtime.errors import UserError
from resnet_jax.training.config import RUN_KEYS, TrainConfig, resolve


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
