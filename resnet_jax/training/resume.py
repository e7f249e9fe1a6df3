"""Where a run starts: a fresh state, or with `--resume` the latest checkpoint's, after checking
that the run's options are the ones it was saved with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from resnet_jax.models.init import variable_shapes
from resnet_jax.models.resnet import ResNet
from resnet_jax.runtime.errors import UserError
from resnet_jax.training.checkpoint import Checkpoints
from resnet_jax.training.config import RUN_KEYS, TrainConfig
from resnet_jax.training.parallel import DataParallel
from resnet_jax.training.reporting import print_once
from resnet_jax.training.steps import TrainState
from resnet_jax.training.transfer import initial_variables

__all__ = ["Start", "changed_options", "checkpoint_meta", "start"]


class Start(NamedTuple):
    """The state a run goes on from, the epochs already done, and the best epoch's matrix."""

    state: TrainState
    history: list[dict[str, Any]]
    best_confusion: dict | None


def checkpoint_meta(
    config: TrainConfig, history: list[dict], classes: list[str] | None, best_confusion: dict | None
) -> dict[str, Any]:
    """The JSON record saved with each checkpoint, which `start` reads back."""
    return {
        "config": {k: getattr(config, k) for k in (*RUN_KEYS, "epochs")},
        "history": history,
        "classes": classes,
        "best_confusion": best_confusion,
    }


def start(
    config: TrainConfig,
    model: ResNet,
    make_state: Callable[[Any], TrainState],
    ckpts: Checkpoints | None,
    dp: DataParallel,
) -> Start:
    """A fresh state (pretrained or random); with `--resume`, the latest checkpoint's."""
    latest = ckpts.latest_epoch() if ckpts else None
    if latest is None:
        if config.resume and ckpts:
            print_once(f"No checkpoint in {ckpts.directory} to resume from; starting a new run.")
        variables, message = initial_variables(model, config.arch, config.weights, config.seed)
        print_once(message)
        return Start(make_state(dp.replicate(variables)), [], None)
    meta = ckpts.meta(latest)
    changed = changed_options(config, meta["config"])
    if changed:
        raise UserError(
            f"Cannot resume {config.output_dir}: it was trained with "
            + ", ".join(changed)
            + "; pass the same values, or choose another --output-dir for a new run."
        )
    abstract = jax.eval_shape(make_state, variable_shapes(model))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dp.replicated), abstract
    )
    state = ckpts.restore(abstract, latest)
    print_once(f"Resuming {config.output_dir} after epoch {latest}.")
    return Start(state, meta["history"], meta.get("best_confusion"))


def _plain(value: Any) -> Any:
    # JSON gives back a tuple (--lr-milestones) as a list.
    return list(value) if isinstance(value, tuple) else value


def changed_options(config: TrainConfig, saved: dict[str, Any]) -> list[str]:
    """`--lr 0.001 (now 0.5)` for each option that defines the run and differs from `saved`
    (a checkpoint's `config`), and `--epochs` when the cosine schedule or torchvision's EMA
    adjustment depends on it."""
    # A run saved before an option existed ran with that option's default.
    saved = {**{k: getattr(TrainConfig(), k) for k in RUN_KEYS}, **saved}
    changed = [
        f"--{k.replace('_', '-')} {saved[k]} (now {getattr(config, k)})"
        for k in RUN_KEYS
        if _plain(saved[k]) != _plain(getattr(config, k))
    ]
    uses = [
        name
        for name, used in (
            ("the cosine schedule", config.schedule == "cosine"),
            ("the EMA decay", config.model_ema and config.model_ema_adjust),
        )
        if used
    ]
    if uses and config.max_steps is None and saved.get("epochs") != config.epochs:
        was, what = saved.get("epochs"), " and ".join(uses)
        changed.append(f"--epochs {was} (now {config.epochs}; it sets {what})")
    return changed
