"""A run's output folder: what a run writes there, when it may write over an earlier run, and
what each epoch adds.

OUTPUT_DIR (default `runs/<arch>`) receives `checkpoints/` (orbax; latest and best epoch),
`best.msgpack` (the variables with the best validation accuracy, with the metadata `predict.py`
needs to preprocess as validation did: `metadata.ModelMetadata`; with `--model-ema`, the weights
or their EMA, whichever validated better, its `weights` field saying which), `class_indices.json`,
`metrics.jsonl` (one line per epoch, with the per-class validation accuracy), `tensorboard/`
(event files: `resnet_jax.training.tensorboard`), and with matplotlib `training_curve.png` and
`confusion_matrix.png` (the best epoch's validation confusion matrix).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax

from resnet_jax.data.sources import write_class_indices
from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import make_folder, remove_stale_temporaries
from resnet_jax.training.checkpoint import Checkpoints
from resnet_jax.training.config import TrainConfig
from resnet_jax.training.reporting import draw_confusion, write_confusion_matrix, write_metrics
from resnet_jax.training.resume import Start, checkpoint_meta
from resnet_jax.training.steps import TrainState, ema_state
from resnet_jax.weights.io import save_variables
from resnet_jax.weights.metadata import ModelMetadata

__all__ = ["OUTPUTS", "best_accuracy", "best_weights", "improved", "outputs_to_replace",
           "prepare_folder", "save_epoch", "write_start"]  # fmt: skip

# What a run writes into its output folder (see the module docstring).
OUTPUTS = ("checkpoints", "best.msgpack", "metrics.jsonl", "class_indices.json",
           "training_curve.png", "confusion_matrix.png", "tensorboard")  # fmt: skip


def outputs_to_replace(out: Path, config: TrainConfig) -> list[str]:
    """The earlier outputs that --overwrite will delete; UserError if a new run would write
    over an earlier one's outputs without --overwrite (or --resume, where it has checkpoints)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file; choose a folder for the run's outputs.")
    found = [name for name in OUTPUTS if (out / name).exists()]
    has_checkpoint = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    if found and not config.overwrite and not (config.resume and has_checkpoint):
        advice = "--resume to continue it, " if has_checkpoint else ""
        raise UserError(
            f"{out} already holds a run ({', '.join(found)}); pass {advice}--overwrite to "
            "replace it, or choose another --output-dir."
        )
    return found if config.overwrite else []


def prepare_folder(out: Path, replaced: list[str]) -> None:
    """Create `out`; delete the outputs --overwrite replaces and what a write killed midway
    left behind."""
    make_folder(out)
    for name in replaced:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    remove_stale_temporaries(out)


def write_start(out: Path, start: Start, classes: list[str] | None, arch: str) -> None:
    """The class list, and what a resumed run had recorded: a kill may have come between a
    checkpoint and the metrics and matrix it records."""
    if jax.process_index() == 0 and classes is not None:
        write_class_indices(out / "class_indices.json", classes)
    if start.history:
        write_metrics(out, start.history)
    if start.best_confusion:
        write_confusion_matrix(out, draw_confusion(start.best_confusion, classes, arch))


def save_epoch(
    out: Path,
    config: TrainConfig,
    state: TrainState,
    history: list[dict],
    ckpts: Checkpoints | None,
    classes: list[str] | None,
    metadata: ModelMetadata | None = None,
    best_confusion: dict | None = None,
) -> None:
    """best.msgpack (if improved: the weights or their EMA, whichever validated better, as
    its metadata says), the orbax checkpoint, metrics.jsonl and the curves."""
    record = history[-1]
    if ckpts is not None:
        ckpts.wait()  # the previous epoch's checkpoint: if its write failed, stop before more
        if improved(history) and jax.process_index() == 0:
            # Before the checkpoint: a kill in between redoes this epoch and rewrites the file.
            kind = best_weights(record)
            chosen = ema_state(state) if kind == "ema" else state
            best = {"params": chosen.params, "batch_stats": chosen.batch_stats}
            if metadata is not None:
                metadata = dataclasses.replace(metadata, weights=kind)
            save_variables(out / "best.msgpack", best, metadata)
        meta = checkpoint_meta(config, history, classes, best_confusion)
        ckpts.save(record["epoch"], state, meta, best_accuracy(record))
    write_metrics(out, history)


def best_weights(record: dict) -> str:
    """ "ema" when the epoch's EMA validated better than its weights (ties go to the weights),
    else "raw"."""
    ema, raw = record.get("ema_val_accuracy"), record["val_accuracy"]
    return "ema" if ema is not None and (raw is None or ema > raw) else "raw"


def best_accuracy(record: dict) -> float | None:
    """The epoch's validation accuracy: of its weights, or of their EMA where that is better."""
    return (
        record.get("ema_val_accuracy") if best_weights(record) == "ema" else record["val_accuracy"]
    )


def improved(history: list[dict]) -> bool:
    """Whether the last epoch has the best validation accuracy so far (the first best on ties),
    counting the EMA's where the run keeps one."""
    previous = [best_accuracy(h) for h in history[:-1] if best_accuracy(h) is not None]
    accuracy = best_accuracy(history[-1])
    return accuracy is not None and accuracy > max(previous, default=-1.0)
