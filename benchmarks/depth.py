"""What depth costs before and during training, scanned and unscanned, each in a fresh process.

    python benchmarks/depth.py                       # the table below for the default archs
    python benchmarks/depth.py --archs resnet152 resnet1202 --batch 2
    python benchmarks/depth.py --step-time resnet50 --batch 16 --image-size 224 --steps 20
    python benchmarks/depth.py --archs resnet1202 --batch 128 --forms scanned --remat

Table, per architecture and form ("unscanned": `scan=False`; "scanned": the default, which
scans the stages with at least `SCAN_MIN_REPEATS` repeated blocks; "all scanned": every stage
with 2 blocks or more, `SCAN_MIN_REPEATS` set to 1): model creation + `init_variables`
seconds; trace, lower and compile seconds of train.py's step (Adam, `DataParallel.jit_train_step`) with JAX's
persistent cache off; the median step seconds after a warm-up step; peak RSS (VmHWM).
ImageNet models run at `--image-size` (default 64), CIFAR ones at 32 px. `--remat`: models
that recompute each block in the backward pass (`ResNet.remat`, train.py's `--remat`).

`--step-time ARCH`: the step seconds of "unscanned" and "all scanned" only, with the CPU
extension's convolutions and with RESNET_JAX_CONV=xla: both forms compiled in one process and
their steps alternating one by one, so that a shared machine's load falls on both alike (the
ratio is what means something there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ARCHS = ("resnet18", "resnet50", "resnet101", "resnet152", "resnet20", "resnet56", "resnet110",
         "resnet1202")  # fmt: skip
FORMS = {"unscanned": None, "scanned": None, "all scanned": 1}  # form -> SCAN_MIN_REPEATS


def peak_rss_mb() -> float:
    """VmHWM of this process in MB (its peak resident memory since exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status (Linux only)")


def build(
    arch: str, form: str, batch: int, size: int, remat: bool = False
) -> tuple[Callable[[], None], dict]:
    """One (architecture, form): timed model creation + init and step compilation; returns a
    function that runs one step to completion, and the timings."""
    import jax
    import numpy as np

    from resnet_jax.models import scan
    from resnet_jax.models.factory import create_model
    from resnet_jax.models.init import init_variables
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.parallel import DataParallel
    from resnet_jax.training.steps import create_state, zero_totals

    if FORMS[form] is not None:
        scan.SCAN_MIN_REPEATS = FORMS[form]  # read when the step is traced, below
    out: dict = {}
    start = time.perf_counter()
    model = create_model(arch, scan=form != "unscanned", remat=remat)
    variables = init_variables(model)
    out["init_s"] = time.perf_counter() - start
    out["scanned"] = sorted(scan.scanned_stages(model.layers, model.scan))

    dp = DataParallel()
    tx = make_optimizer("adam", 1e-4, 0.0)
    state = jax.jit(lambda v: create_state(model.apply, tx, v), out_shardings=dp.replicated)(
        dp.replicate(variables)
    )
    rng = np.random.default_rng(0)
    data = dp.shard({
        "image": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
        "label": rng.integers(0, model.num_classes, batch).astype(np.int32),
        "mask": np.ones(batch, bool),
    })  # fmt: skip
    totals = dp.replicate(zero_totals())
    start = time.perf_counter()
    traced = dp.jit_train_step().trace(state, data, totals)
    out["trace_s"] = time.perf_counter() - start
    lowered = traced.lower()
    out["lower_s"] = time.perf_counter() - start - out["trace_s"]
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - start - out["trace_s"] - out["lower_s"]
    holder = [state]

    def step() -> None:
        holder[0], new_totals = compiled(holder[0], data, totals)
        jax.block_until_ready(new_totals)

    return step, out


def seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(arch: str, form: str, batch: int, size: int, steps: int, remat: bool) -> dict:
    """Runs in a fresh process: init, compile, step seconds and peak memory of one form."""
    step, out = build(arch, form, batch, size, remat)
    step()  # a warm-up
    out["step_s"] = statistics.median(seconds(step) for _ in range(steps))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def pair_worker(arch: str, batch: int, size: int, steps: int) -> dict:
    """Runs in a fresh process: "unscanned" and "all scanned" steps, alternating one by one, so
    that the load of a shared machine falls on both alike."""
    forms = ("unscanned", "all scanned")
    runs = [build(arch, form, batch, size)[0] for form in forms]
    for run in runs:
        run()  # a warm-up
    times: list[list[float]] = [[], []]
    for i in range(steps):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            times[j].append(seconds(runs[j]))
    ratios = [b / a for a, b in zip(*times)]
    return {form: statistics.median(t) for form, t in zip(forms, times)} | {
        "ratio": statistics.median(ratios)
    }


def run_worker(args: list[str], env: dict) -> dict:
    """This script with `args` in a fresh process (persistent compilation cache off); its JSON
    line, or the last line of its error."""
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false", **env}
    cmd = [sys.executable, __file__, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def size_of(arch: str, image_size: int) -> int:
    from resnet_jax.models.registry import get_architecture

    return 32 if get_architecture(arch).stem == "cifar" else image_size


def table(args: argparse.Namespace) -> None:
    print(f"batch {args.batch}, ImageNet models at {args.image_size} px, CIFAR ones at 32 px; "
          f"{os.cpu_count()} CPUs; step: median of {args.steps} after one"
          + ("; remat" if args.remat else ""))  # fmt: skip
    header = ("arch", "form", "scanned", "init s", "trace s", "lower s", "compile s", "step s",
              "peak RSS MB")  # fmt: skip
    print(" | ".join(header))
    for arch in args.archs:
        for form in args.forms:
            cmd = ["--worker", arch, form, "--batch", str(args.batch), *(["--remat"] * args.remat), "--image-size",
                   str(size_of(arch, args.image_size)), "--steps", str(args.steps)]  # fmt: skip
            r = run_worker(cmd, {})
            if "error" in r:
                print(f"{arch} | {form} | error: {r['error']}", flush=True)
                continue
            stages = ",".join(f"layer{s}" for s in r["scanned"]) or "-"
            cells = [r[k] for k in ("init_s", "trace_s", "lower_s", "compile_s", "step_s")]
            print(f"{arch} | {form} | {stages} | " + " | ".join(f"{c:.2f}" for c in cells)
                  + f" | {r['peak_rss_mb']:.0f}", flush=True)  # fmt: skip


def step_time(args: argparse.Namespace) -> None:
    arch, size = args.step_time, size_of(args.step_time, args.image_size)
    print(f"{arch}, batch {args.batch}, {size} px: median step seconds of {args.steps} steps of "
          "each form, alternating in one process")  # fmt: skip
    for conv in ("onednn", "xla"):
        cmd = ["--pair", arch, "--batch", str(args.batch), "--image-size", str(size),
               "--steps", str(args.steps)]  # fmt: skip
        r = run_worker(cmd, {"RESNET_JAX_CONV": conv})
        if "error" in r:
            print(f"RESNET_JAX_CONV={conv}: error: {r['error']}", flush=True)
            continue
        print(f"RESNET_JAX_CONV={conv}: unscanned {r['unscanned']:.3f} s, all scanned "
              f"{r['all scanned']:.3f} s, median ratio scanned/unscanned {r['ratio']:.3f}",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=["unscanned", "scanned"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step-time", metavar="ARCH")
    parser.add_argument("--remat", action="store_true", help="models with remat=True")
    parser.add_argument("--worker", nargs=2, metavar=("ARCH", "FORM"), help=argparse.SUPPRESS)
    parser.add_argument("--pair", metavar="ARCH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.pair:
        from resnet_jax.runtime.memory import keep_freed_memory

        keep_freed_memory()  # as train.py does, before any JAX computation
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.image_size, args.steps, args.remat)))
    elif args.pair:
        print(json.dumps(pair_worker(args.pair, args.batch, args.image_size, args.steps)))
    elif args.step_time:
        step_time(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
