"""trainer.train in this process on a tiny image folder, and its parts: the output folder's
policy (run_folder), the option check of --resume (resume), one epoch (loop)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.runtime.errors import UserError
from resnet_jax.training.batches import TrainValBatches
from resnet_jax.training.checkpoint import Checkpoints
from resnet_jax.training.config import RUN_KEYS, TrainConfig, resolve
from resnet_jax.training.loop import EpochLoop, evaluate, train_epoch
from resnet_jax.training.parallel import DataParallel
from resnet_jax.training.resume import changed_options
from resnet_jax.training.run_folder import (
    OUTPUTS,
    best_accuracy,
    best_weights,
    improved,
    outputs_to_replace,
    prepare_folder,
)
from resnet_jax.training.run_setup import Length
from resnet_jax.training.steps import StepOptions, ema_state
from resnet_jax.training.tensorboard import TensorBoard
from resnet_jax.training.trainer import train
from resnet_jax.weights.io import load_variables, read_metadata
from tests.helpers import flat, make_train_val_folder, tensorboard_series

pytestmark = pytest.mark.usefixtures("private_compilation_cache")

# 2 steps of 4 images at 32 px per epoch, one validation batch: seconds on a shared CPU.
STEPS = 2
TINY = TrainConfig(arch="resnet18", weights="none", image_size=32, batch_size=4, workers=1,
                   optimizer="sgd", lr=1e-3, log_every=1)  # fmt: skip
TIMES = ("seconds", "images_per_second", "first_step_seconds")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val_folder(tmp_path_factory.mktemp("data"), classes=2, train=4, val=2)


def run(data, out, **changes) -> object:
    return train(dataclasses.replace(TINY, data_dir=str(data), output_dir=str(out), **changes))


@pytest.fixture(scope="module")
def two_epochs(data, tmp_path_factory):
    return run(data, tmp_path_factory.mktemp("run"), epochs=2)


def without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMES} for record in history]


def saved_meta(out: Path) -> dict:
    """The JSON record of the latest checkpoint in `out`."""
    ckpts = Checkpoints(out / "checkpoints")
    try:
        return ckpts.meta()
    finally:
        ckpts.close()


def test_train_returns_what_it_wrote(two_epochs):
    out, history = two_epochs.output_dir, two_epochs.history
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    assert [h["epoch"] for h in history] == [1, 2] and int(two_epochs.state.step) == 2 * STEPS
    assert saved_meta(out)["history"] == history
    assert read_metadata(out / "best.msgpack").classes == ("class0", "class1")
    best = max(history, key=lambda h: h["val_accuracy"])["epoch"]
    final = flat({"params": two_epochs.state.params, "batch_stats": two_epochs.state.batch_stats})
    saved = flat(load_variables(out / "best.msgpack"))
    assert all(np.array_equal(v, final[k]) for k, v in saved.items()) == (best == 2)


def test_confusion_matrix_of_the_best_epoch(two_epochs):
    out, history = two_epochs.output_dir, two_epochs.history
    best = max(history, key=lambda h: h["val_accuracy"])  # the first of equals, as best.msgpack
    confusion = saved_meta(out)["best_confusion"]
    matrix = np.array(confusion["matrix"])
    assert confusion["epoch"] == best["epoch"]
    np.testing.assert_array_equal(matrix.sum(axis=1), [2, 2])  # the validation images
    assert np.trace(matrix) / matrix.sum() == best["val_accuracy"]
    assert best["val_class_accuracy"] == {f"class{c}": matrix[c, c] / 2 for c in range(2)}
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_shows_metrics_jsonl(two_epochs):
    series = tensorboard_series(two_epochs.output_dir / "tensorboard")
    steps = list(range(1, 2 * STEPS + 1))  # a point every step: log_every=1
    expected = {"step/learning_rate": [(s, pytest.approx(1e-3)) for s in steps]}
    for m in two_epochs.history:
        for key, value in m.items():
            values = value.items() if isinstance(value, dict) else [(None, value)]
            for name, v in values:  # val_class_accuracy: one series per class
                tag = f"epoch/{key}" + (f"/{name}" if name else "")
                if key != "epoch":  # TensorBoard keeps float32
                    expected.setdefault(tag, []).append((m["epoch"] * STEPS, approx(v)))
    assert {tag: series[tag] for tag in expected} == expected
    assert [step for step, _ in series["step/train_loss"]] == steps
    assert [step for step, _ in series["epoch/val_confusion_matrix"]] == [STEPS, 2 * STEPS]
    assert set(series) == {*expected, "step/train_loss", "epoch/val_confusion_matrix"}


def approx(value: float):
    return pytest.approx(value, rel=1e-6)


def test_resume_ends_where_an_uninterrupted_run_ends(two_epochs, data, tmp_path):
    first = run(data, tmp_path, epochs=1)
    resumed = run(data, tmp_path, epochs=2, resume=True)
    assert without_times(resumed.history) == without_times(two_epochs.history)
    assert resumed.history[0] == first.history[0]
    got, want = (
        jax.device_get((r.state.params, r.state.batch_stats, r.state.opt_state))
        for r in (resumed, two_epochs)
    )
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_finished_run_trains_no_further(two_epochs, data, capsys):
    again = run(data, two_epochs.output_dir, epochs=2, resume=True)
    assert again.history == two_epochs.history
    assert "is already trained for 2 epochs" in capsys.readouterr().out


def test_a_changed_option_stops_a_resume(two_epochs, data):
    with pytest.raises(UserError, match=r"it was trained with --lr 0.001 \(now 0.5\); pass the"):
        run(data, two_epochs.output_dir, epochs=3, resume=True, lr=0.5)


def test_outputs_of_an_earlier_run_are_never_replaced_silently(two_epochs, data, tmp_path):
    # An earlier run whose checkpoints/ was deleted to save space, and a write killed midway.
    kept = ("best.msgpack", "metrics.jsonl", "class_indices.json")
    for name in kept:
        shutil.copy(two_epochs.output_dir / name, tmp_path / name)
    shutil.copytree(two_epochs.output_dir / "tensorboard", tmp_path / "tensorboard")
    old_events = set(os.listdir(tmp_path / "tensorboard"))
    (tmp_path / ".best.msgpack.k2j4_x9a.tmp").write_bytes(b"half")
    before = {name: (tmp_path / name).read_bytes() for name in kept}
    refusal = (
        r"already holds a run \(best.msgpack, metrics.jsonl, class_indices.json, tensorboard\); "
        "pass --overwrite to replace it"
    )
    for resume in (False, True):
        with pytest.raises(UserError, match=refusal):
            run(data, tmp_path, epochs=1, resume=resume)
        assert {name: (tmp_path / name).read_bytes() for name in kept} == before
        assert set(os.listdir(tmp_path / "tensorboard")) == old_events
    replaced = run(data, tmp_path, epochs=1, overwrite=True)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert replaced.history[0]["epoch"] == 1 and (tmp_path / "checkpoints").is_dir()
    assert not set(os.listdir(tmp_path / "tensorboard")) & old_events
    assert not (tmp_path / ".best.msgpack.k2j4_x9a.tmp").exists()


def test_a_nan_loss_stops_and_keeps_the_good_checkpoint(two_epochs, data, tmp_path, monkeypatch):
    compile_step = DataParallel.jit_train_step

    def jit_poisoned_step(self, options=None):
        step = compile_step(self, options)

        def poisoned(state, batch, totals):
            if int(state.step) == 3:  # the second step of epoch 2
                state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
            return step(state, batch, totals)

        return poisoned

    monkeypatch.setattr(DataParallel, "jit_train_step", jit_poisoned_step)
    with pytest.raises(
        UserError, match="loss became nan in epoch 2, .*checkpoint of epoch 1 is kept"
    ):
        run(data, tmp_path, epochs=2)
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert without_times([json.loads(line) for line in lines]) == without_times(
        two_epochs.history[:1]
    )
    assert all(
        np.isfinite(v).all() for v in flat(load_variables(tmp_path / "best.msgpack")).values()
    )


# ---------------------------------------------------------------------------------------------
# run_folder: whose outputs a run may replace


def test_outputs_to_replace(tmp_path):
    config = dataclasses.replace(TINY, output_dir=str(tmp_path))
    assert outputs_to_replace(tmp_path / "new", config) == []
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("")  # not an output: never a reason to refuse
    with pytest.raises(UserError, match=r"holds a run \(metrics.jsonl\); pass --overwrite"):
        outputs_to_replace(tmp_path, config)
    with pytest.raises(UserError, match="pass --overwrite"):  # nothing to resume from
        outputs_to_replace(tmp_path, dataclasses.replace(config, resume=True))
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    with pytest.raises(UserError, match="pass --resume to continue it, --overwrite"):
        outputs_to_replace(tmp_path, config)
    assert outputs_to_replace(tmp_path, dataclasses.replace(config, resume=True)) == []
    overwrite = dataclasses.replace(config, overwrite=True)
    assert outputs_to_replace(tmp_path, overwrite) == ["checkpoints", "metrics.jsonl"]
    with pytest.raises(UserError, match="is a file; choose a folder"):
        outputs_to_replace(tmp_path / "notes.txt", config)


def test_prepare_folder_deletes_only_what_it_replaces(tmp_path):
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / ".best.msgpack.k2j4_x9a.tmp").write_bytes(b"half")  # a write killed midway
    prepare_folder(tmp_path, ["checkpoints", "metrics.jsonl"])
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    prepare_folder(tmp_path / "new", [])
    assert (tmp_path / "new").is_dir()


def test_improved_keeps_the_first_of_equals():
    history = [{"val_accuracy": a} for a in (0.5, 0.75)]
    assert improved(history[:1]) and improved(history)
    assert not improved([*history, {"val_accuracy": 0.75}])
    assert not improved([*history, {"val_accuracy": None}])


# ---------------------------------------------------------------------------------------------
# resume: the options a run must keep


def saved_config(config: TrainConfig, *leave_out: str) -> dict:
    """A checkpoint's `config` record of a run with `config`, saved before `leave_out` existed."""
    keys = [*RUN_KEYS, "epochs"]
    return {k: getattr(config, k) for k in keys if k not in leave_out}


def test_changed_options_names_each_change():
    config = resolve(dataclasses.replace(TINY, epochs=3))
    saved = saved_config(config)
    assert changed_options(config, saved) == []
    assert changed_options(dataclasses.replace(config, lr=0.5), saved) == ["--lr 0.001 (now 0.5)"]
    assert changed_options(dataclasses.replace(config, epochs=5), saved) == []
    cosine = dataclasses.replace(config, schedule="cosine")
    assert changed_options(dataclasses.replace(cosine, epochs=5), saved_config(cosine)) == [
        "--epochs 3 (now 5; it sets the cosine schedule)"
    ]


def test_changed_options_take_defaults_for_options_newer_than_the_run():
    config = resolve(TINY)
    saved = saved_config(config, "head")
    assert changed_options(config, saved) == []
    append = dataclasses.replace(config, head="append")
    assert changed_options(append, saved) == ["--head replace (now append)"]


# ---------------------------------------------------------------------------------------------
# loop: one epoch, with steps that count instead of training

DP = DataParallel()


def counting_step(losses):
    """A train step whose loss is `losses[state]`, one correct answer of two per step."""

    def step(state, batch, totals):
        new = {"loss": totals["loss"] + 2 * losses[state], "correct": totals["correct"] + 1,
               "count": totals["count"] + 2}  # fmt: skip
        return state + 1, new

    return step


def test_train_epoch_means_and_logs_every_step():
    logged = []
    state, metrics, compile_s, seconds = train_epoch(
        counting_step([1.0, 2.0, 3.0]), 0, iter(range(3)), 3, DP, "train",
        skip_first=True, log=lambda done, totals: logged.append((done, float(totals["count"]))),
    )  # fmt: skip
    assert state == 3 and metrics == {"loss": 2.0, "accuracy": 0.5}
    assert compile_s > 0 and seconds > 0
    assert logged == [(0, 0.0), (1, 2.0), (2, 4.0), (3, 6.0)]


def test_train_epoch_stops_at_a_nan_loss():
    steps = 5
    state, metrics, _, _ = train_epoch(
        counting_step([np.nan] * steps), 0, iter(range(steps)), steps, DP, "train",
        skip_first=False, log=lambda done, totals: None,
    )  # fmt: skip
    assert np.isnan(metrics["loss"]) and state < steps


def test_evaluate_counts_the_confusion_matrix():
    def step(state, batch, totals):
        counts = jnp.zeros_like(totals["confusion"]).at[batch].add(1)
        return {"loss": totals["loss"] + 1, "correct": totals["correct"] + (batch[0] == batch[1]),
                "count": totals["count"] + 1, "confusion": totals["confusion"] + counts}  # fmt: skip

    pairs = [(0, 0), (1, 0), (1, 1), (1, 1)]
    result = evaluate(step, None, iter(pairs), len(pairs), 2, DP, "val")
    assert (result["loss"], result["accuracy"]) == (1.0, 0.75)
    np.testing.assert_array_equal(result["confusion"], [[1, 0], [1, 2]])


def fake_loop(losses, synthetic=0):
    """An EpochLoop over 2 training steps, its steps replaced by counting ones."""
    config = dataclasses.replace(TINY, epochs=3, synthetic=synthetic)
    data = SimpleNamespace(steps=2, val_steps=0, train=lambda epoch, steps: iter(range(steps)))
    tb, length = TensorBoard(None, 1, lambda step: 0.0), Length(3, 2, 6, 0)
    loop = EpochLoop(config, data, DP, tb, length, StepOptions())
    loop.train_step = counting_step(losses)
    return loop


def test_epoch_loop_records_the_epoch():
    state, record, confusion = fake_loop([1.0, 3.0]).run(0, epoch=1)
    assert state == 2 and confusion is None
    assert (record["epoch"], record["train_loss"], record["train_accuracy"]) == (1, 2.0, 0.5)
    assert record["val_accuracy"] is None and record["first_step_seconds"] > 0


@pytest.mark.parametrize(
    "epoch, synthetic, kept",
    [(1, 0, "no checkpoint was written"), (2, 0, "the checkpoint of epoch 1 is kept"),
     (2, 3, "no checkpoint was written")],
)  # fmt: skip
def test_a_nan_loss_is_one_user_error(epoch, synthetic, kept):
    with pytest.raises(
        UserError, match=f"loss became nan in epoch {epoch}, .*; {kept}. Lower --lr"
    ):
        fake_loop([np.nan, np.nan], synthetic).run(0, epoch=epoch)


# ---------------------------------------------------------------------------------------------
# The recipe's options, all at once: the run, its EMA, best.msgpack and --resume

RECIPE = {"optimizer": "sgd-nesterov", "weight_decay": 1e-4, "norm_weight_decay": 0.0,
          "schedule": "multistep", "lr_milestones": (3,), "lr_step_unit": "steps",
          "warmup_steps": 1, "warmup_method": "constant", "warmup_factor": 0.1,
          "label_smoothing": 0.1, "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "random_erase": 0.5,
          "accumulate_steps": 2, "model_ema": True, "model_ema_decay": 0.5,
          "model_ema_warmup": "timm", "auto_augment": "ta_wide", "ra_reps": 2,
          "eval_resize": 36, "eval_crop": 32, "lr": 0.05}  # fmt: skip


@pytest.fixture(scope="module")
def recipe_run(data, tmp_path_factory):
    return run(data, tmp_path_factory.mktemp("recipe"), epochs=2, **RECIPE)


def test_a_recipe_run_validates_and_keeps_the_ema(recipe_run):
    out, history = recipe_run.output_dir, recipe_run.history
    assert int(recipe_run.state.step) == 4
    for record in history:
        assert 0 <= record["ema_val_accuracy"] <= 1 and record["ema_val_loss"] > 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    # The EMA differs from the weights (decay 0.5), and best.msgpack holds the better of the
    # two at the best epoch, as its metadata says.
    state = recipe_run.state
    assert not np.array_equal(state.ema["params"]["fc"]["kernel"], state.params["fc"]["kernel"])
    best = max(history, key=best_accuracy)
    metadata = read_metadata(out / "best.msgpack")
    assert metadata.weights == best_weights(best)
    assert (metadata.resize_size, metadata.crop_size, metadata.image_size) == (36, 32, 32)
    if best["epoch"] == 2:  # then the final state holds what best.msgpack saved
        chosen = ema_state(state) if metadata.weights == "ema" else state
        want = flat({"params": chosen.params, "batch_stats": chosen.batch_stats})
        for name, value in flat(load_variables(out / "best.msgpack")).items():
            np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_a_recipe_run_resumes_exactly(recipe_run, data, tmp_path):
    first = run(data, tmp_path, epochs=1, **RECIPE)
    resumed = run(data, tmp_path, epochs=2, resume=True, **RECIPE)
    assert without_times(resumed.history) == without_times(recipe_run.history)
    assert resumed.history[0] == first.history[0]
    got, want = (
        jax.device_get((r.state.params, r.state.batch_stats, r.state.opt_state, r.state.ema))
        for r in (resumed, recipe_run)
    )
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_max_steps_ends_the_run_inside_an_epoch(data, tmp_path):
    result = run(data, tmp_path, epochs=1, max_steps=3)
    assert [h["epoch"] for h in result.history] == [1, 2] and int(result.state.step) == 3


def test_the_loaders_follow_the_recipe(data):
    config = resolve(dataclasses.replace(
        TINY, data_dir=str(data), train_crop_mode="pad_crop", crop_padding=2,
        auto_augment="randaugment", ra_reps=3, eval_resize=40, eval_crop=24,
    ))  # fmt: skip
    batches = TrainValBatches(config, DP)
    transform = batches.train_loader.transform
    assert (transform.crop, transform.padding, transform.auto_augment) == (
        "pad_crop", 2, "randaugment",
    )  # fmt: skip
    assert batches.train_loader.repeats == 3
    assert (batches.val_loader.resize_size, batches.val_loader.image_size) == (40, 24)
    assert len(list(batches.train(1, steps=1))) == 1
