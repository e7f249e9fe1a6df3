"""What depth costs before and during training, scanned and unscanned, each in a fresh process.

    python benchmarks/depth.py                       # the table below for the default archs
    python benchmarks/depth.py --archs resnet152 resnet1202 --batch 2
    python benchmarks/depth.py --step-time resnet50 --batch 16 --image-size 224 --rounds 3
    python benchmarks/depth.py --archs resnet1202 --batch 128 --forms scanned

Table, per architecture and form ("unscanned": `scan=False`; "scanned": the default, which
scans the stages with at least `SCAN_MIN_REPEATS` repeated blocks; "all scanned": every stage
with 2 blocks or more, `SCAN_MIN_REPEATS` set to 1): model creation + `init_variables`
seconds; trace, lower and compile seconds of train.py's step (Adam, `DataParallel.jit_train_step`) with JAX's
persistent cache off; the median step seconds after a warm-up step; peak RSS (VmHWM).
ImageNet models run at `--image-size` (default 64), CIFAR ones at 32 px.

`--step-time ARCH`: the step seconds of "unscanned" and "all scanned" only, with the CPU
extension's convolutions and with RESNET_JAX_CONV=xla, the processes alternating over
`--rounds` rounds (a ratio within one run is what means something on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
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


def worker(arch: str, form: str, batch: int, size: int, steps: int) -> dict:
    """Runs in a fresh process: init, compile and step of one (architecture, form)."""
    from resnet_jax.runtime.memory import keep_freed_memory

    keep_freed_memory()  # as train.py does
    import jax
    import numpy as np

    from resnet_jax.models import scan
    from resnet_jax.models.factory import create_model
    from resnet_jax.models.init import init_variables
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.parallel import DataParallel
    from resnet_jax.training.steps import create_state, zero_totals

    jax.config.update("jax_enable_compilation_cache", False)
    if FORMS[form] is not None:
        scan.SCAN_MIN_REPEATS = FORMS[form]
    out: dict = {}
    start = time.perf_counter()
    model = create_model(arch, scan=form != "unscanned")
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
    step = dp.jit_train_step()
    start = time.perf_counter()
    traced = step.trace(state, data, totals)
    out["trace_s"] = time.perf_counter() - start
    lowered = traced.lower()
    out["lower_s"] = time.perf_counter() - start - out["trace_s"]
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - start - out["trace_s"] - out["lower_s"]
    times = []
    for _ in range(steps + 1):  # the first one warms up
        start = time.perf_counter()
        state, new_totals = compiled(state, data, totals)
        jax.block_until_ready(new_totals)
        times.append(time.perf_counter() - start)
    out["step_s"] = statistics.median(times[1:])
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def in_subprocess(args: argparse.Namespace, arch: str, form: str, size: int, env: dict) -> dict:
    """`worker` in a fresh process; its JSON line."""
    cmd = [sys.executable, __file__, "--worker", arch, form, "--batch", str(args.batch),
           "--image-size", str(size), "--steps", str(args.steps)]  # fmt: skip
    env = {**os.environ, **env}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def size_of(arch: str, image_size: int) -> int:
    from resnet_jax.models.registry import get_architecture

    return 32 if get_architecture(arch).stem == "cifar" else image_size


def table(args: argparse.Namespace) -> None:
    print(f"batch {args.batch}, ImageNet models at {args.image_size} px, CIFAR ones at 32 px; "
          f"{os.cpu_count()} CPUs; step: median of {args.steps} after one")  # fmt: skip
    header = ("arch", "form", "scanned", "init s", "trace s", "lower s", "compile s", "step s",
              "peak RSS MB")  # fmt: skip
    print(" | ".join(header))
    for arch in args.archs:
        for form in args.forms:
            r = in_subprocess(args, arch, form, size_of(arch, args.image_size), {})
            if "error" in r:
                print(f"{arch} | {form} | error: {r['error']}", flush=True)
                continue
            stages = ",".join(f"layer{s}" for s in r["scanned"]) or "-"
            cells = [r[k] for k in ("init_s", "trace_s", "lower_s", "compile_s", "step_s")]
            print(f"{arch} | {form} | {stages} | " + " | ".join(f"{c:.2f}" for c in cells)
                  + f" | {r['peak_rss_mb']:.0f}", flush=True)  # fmt: skip


def step_time(args: argparse.Namespace) -> None:
    arch, size = args.step_time, size_of(args.step_time, args.image_size)
    print(f"{arch}, batch {args.batch}, {size} px: step seconds (median of {args.steps} after "
          f"one), {args.rounds} alternating rounds")  # fmt: skip
    for conv in ("onednn", "xla"):
        env = {"RESNET_JAX_CONV": conv}
        times: dict[str, list[float]] = {"unscanned": [], "all scanned": []}
        for _ in range(args.rounds):
            for form, seconds in times.items():
                seconds.append(in_subprocess(args, arch, form, size, env)["step_s"])
        a, b = (statistics.median(times[f]) for f in ("unscanned", "all scanned"))
        rounds = {f: " ".join(f"{t:.3f}" for t in ts) for f, ts in times.items()}
        print(f"RESNET_JAX_CONV={conv}: unscanned {a:.3f} s ({rounds['unscanned']}), all "
              f"scanned {b:.3f} s ({rounds['all scanned']}), scanned/unscanned {b / a:.3f}",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=["unscanned", "scanned"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step-time", metavar="ARCH")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("ARCH", "FORM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch, args.image_size, args.steps)))
    elif args.step_time:
        step_time(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
