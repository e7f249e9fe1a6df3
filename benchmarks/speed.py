"""resnet_jax against torchvision on this machine's CPU, in one run, with ratios ours/torch.

    python benchmarks/speed.py                  # resnet18/34/50, resnext50_32x4d; batch 16, 224 px
    python benchmarks/speed.py --quick          # smoke run: resnet18 at 64 px, a few repeats
    python benchmarks/speed.py --archs resnet50 --batch 16 --image-size 224 --repeats 7

Measures, alternating the sides (A B C A B C ...) so that drift and load hit all alike:
- train: images/s of one step (forward, backward, Adam, BatchNorm in train mode). Ours is the
  step train.py runs (`DataParallel.jit_train_step` on uint8 images normalised on the device);
  torchvision's is eager with torch.optim.Adam and cross-entropy, in NCHW and channels_last.
  Each side trains in a fresh process of its own, as a user runs it, the processes alternating
  (`--rounds` of them): in a shared process, torch's channels_last step ran 13% faster whenever
  an eager step ran between its steps (resnet50: 2.41 s against 2.78 s alone), which no user
  of one of them gets. Ours sets malloc up as train.py does (`resnet_jax.runtime.memory`: freed step
  buffers are kept for reuse instead of page-faulted in afresh); torch gains from the same
  settings, so a second row gives torch's sides with them too.
- eval b16/b64 images/s and b1 latency: the predict path (`Predictor.predict_arrays`: uint8
  images normalised on the device, jitted softmax, result copied to the host) against torch
  under inference_mode from float input.
- first step (s): a fresh process's first train step (trace, compile, run), with an empty and
  then a warm persistent compilation cache (the trainer's `enable_compilation_cache`).
- peak RSS (MB): VmHWM of a fresh process that builds the model and runs 3
  train steps (compilation included for ours); the RSS after the imports is shown beside it.
- train.py --synthetic: images/s from the trainer's own metrics.jsonl (trainer overhead).
torch gets as many threads as JAX has cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from resnet_jax.runtime.memory import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent
CORES = len(os.sched_getaffinity(0))
ARCHS = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")


def timed(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each function, called in turns after two warm-up rounds."""
    for _ in range(2):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB. Unlike getrusage's ru_maxrss, the
    peak starts afresh at exec, so a child does not inherit the benchmark process's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


# ---------------------------------------------------------------------------------------------
# The two sides


def jax_train_step(arch: str, batch: int, size: int) -> Callable[[], None]:
    """train.py's compiled step on a fixed uint8 batch; each call runs one step to completion."""
    import jax

    from resnet_jax.models.factory import create_model, init_variables
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.parallel import DataParallel
    from resnet_jax.training.steps import create_state, zero_totals

    dp = DataParallel()
    model = create_model(arch)
    variables = init_variables(model)  # drawn on the host: no model-sized graph compiled
    tx = make_optimizer("adam", 1e-4, 0.0)
    make_state = jax.jit(lambda v: create_state(model.apply, tx, v), out_shardings=dp.replicated)
    state = make_state(dp.replicate(variables))  # as the trainer builds it
    rng = np.random.default_rng(0)
    data = dp.shard(
        {
            "image": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
            "label": rng.integers(0, 1000, batch).astype(np.int32),
            "mask": np.ones(batch, bool),
        }
    )
    totals = dp.replicate(zero_totals())
    step = dp.jit_train_step()
    holder = [state]

    def run() -> None:
        holder[0], new_totals = step(holder[0], data, totals)
        jax.block_until_ready(new_totals)

    return run


def jax_predict(arch: str, batch: int, size: int) -> Callable[[], object]:
    """predict.py's path: `Predictor.predict_arrays` on eval-transformed uint8 NHWC images."""

    from resnet_jax.inference.predictor import Predictor
    from resnet_jax.models.factory import create_model, init_variables

    model = create_model(arch)
    variables = init_variables(model)  # drawn on the host: no model-sized graph compiled
    predictor = Predictor(model, variables, [str(i) for i in range(1000)])
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return lambda: predictor.predict_arrays(x)


def torch_train_step(arch: str, batch: int, size: int, channels_last: bool) -> Callable[[], None]:
    """torchvision eager: zero_grad, forward, cross-entropy, backward, Adam step."""
    import torch
    import torchvision

    torch.set_num_threads(CORES)
    net = getattr(torchvision.models, arch)().train()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-4)

    def run() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    return run


def torch_predict(arch: str, batch: int, size: int, channels_last: bool) -> Callable[[], object]:
    import torch
    import torchvision

    torch.set_num_threads(CORES)
    net = getattr(torchvision.models, arch)().eval()
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)

    def run() -> object:
        with torch.inference_mode():
            return torch.softmax(net(x), dim=1).numpy()

    return run


# ---------------------------------------------------------------------------------------------
# Fresh-process measurements


# Ours (malloc set up as train.py does), torch eager NCHW, torch channels_last, and both torch
# sides again with the same malloc settings as ours (see keep_freed_memory).
TRAIN_SIDES = ("jax", "torch", "torch-cl", "torch+kept", "torch-cl+kept")


def train_worker(side: str, arch: str, batch: int, size: int, repeats: int) -> dict:
    """Runs in a subprocess: the median seconds of one side's train step, after two warm-ups."""
    if side == "jax" or side.endswith("+kept"):
        keep_freed_memory()
    if side == "jax":
        run = jax_train_step(arch, batch, size)
    else:
        run = torch_train_step(arch, batch, size, channels_last=side.startswith("torch-cl"))
    return {"step_s": timed([run], repeats)[0]}


def isolated_train_steps(arch: str, batch: int, size: int, repeats: int, rounds: int) -> dict:
    """Median train-step seconds of each of TRAIN_SIDES, each in its own processes, alternating."""
    times: dict[str, list[float]] = {side: [] for side in TRAIN_SIDES}
    for _ in range(rounds):
        for side in TRAIN_SIDES:
            cmd = ["--train-worker", side, "--repeats", str(repeats)]
            times[side].append(in_subprocess(cmd, arch, batch, size)["step_s"])
    return {side: statistics.median(t) for side, t in times.items()}


def worker(kind: str, arch: str, batch: int, size: int) -> dict:
    """Runs in a subprocess: first-step seconds and memory of one side."""
    if kind == "jax":
        keep_freed_memory()
        from resnet_jax.runtime.cache import enable_compilation_cache

        enable_compilation_cache()  # JAX_COMPILATION_CACHE_DIR (set by the parent) wins
        import jax  # noqa: F401  (the imports are part of the baseline)
    else:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    baseline = memory_mb("VmRSS")
    make = jax_train_step if kind == "jax" else lambda *a: torch_train_step(*a, False)
    run = make(arch, batch, size)
    steps = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        steps.append(time.perf_counter() - start)
    return {"steps_s": steps, "peak_rss_mb": memory_mb("VmHWM"), "baseline_rss_mb": baseline}


def in_subprocess(
    args: list[str], arch: str, batch: int, size: int, cache: str | None = None
) -> dict:
    """This script run with `args` in a fresh process; its last line of output, as JSON."""
    env = {**os.environ, **({"JAX_COMPILATION_CACHE_DIR": cache} if cache else {})}
    cmd = [sys.executable, __file__, *args, "--archs", arch]
    cmd += ["--batch", str(batch), "--image-size", str(size)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def trainer_images_per_second(arch: str, batch: int, size: int, steps: int) -> float:
    """images/s that `train.py --synthetic` records (the first, compiling step excluded)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "train.py"), "--arch", arch, "--synthetic", str(steps)]
        cmd += ["--epochs", "1", "--batch-size", str(batch), "--image-size", str(size)]
        cmd += ["--output-dir", out]
        subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        record = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
        return record["images_per_second"]


# ---------------------------------------------------------------------------------------------
# The run


def bench_arch(arch: str, args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    """Rows (measure, ours, torch eager, torch channels_last) for one architecture."""
    b, s, r = args.batch, args.image_size, args.repeats
    rows = []
    train = isolated_train_steps(arch, b, s, r, args.rounds)
    rows.append(("train images/s", *(b / train[side] for side in TRAIN_SIDES[:3])))
    kept = (b / train[side] for side in ("jax", "torch+kept", "torch-cl+kept"))
    rows.append(("  torch malloc kept as ours", *kept))
    for n in (args.batch, args.eval_batch):
        sides = [jax_predict(arch, n, s), torch_predict(arch, n, s, False)]
        sides.append(torch_predict(arch, n, s, True))
        rows.append((f"eval b{n} images/s", *(n / t for t in timed(sides, r))))
    sides = [jax_predict(arch, 1, s), torch_predict(arch, 1, s, False)]
    sides.append(torch_predict(arch, 1, s, True))
    rows.append(("b1 latency ms", *(1e3 * t for t in timed(sides, 4 * r))))

    if not args.skip_subprocess:
        with tempfile.TemporaryDirectory() as cache:
            cold = in_subprocess(["--worker", "jax"], arch, b, s, cache)
            warm = in_subprocess(["--worker", "jax"], arch, b, s, cache)
        theirs = in_subprocess(["--worker", "torch"], arch, b, s, cache)
        first = theirs["steps_s"][0]
        rows.append(("first step s (cold cache)", cold["steps_s"][0], first, 0))
        rows.append(("first step s (warm cache)", warm["steps_s"][0], first, 0))
        rows.append(("second step s (cold process)", cold["steps_s"][1], theirs["steps_s"][1], 0))
        rows.append(("train peak RSS MB", cold["peak_rss_mb"], theirs["peak_rss_mb"], 0))
        rows.append(
            ("  RSS after imports MB", cold["baseline_rss_mb"], theirs["baseline_rss_mb"], 0)
        )
        ips = trainer_images_per_second(arch, b, s, args.trainer_steps)
        rows.append(("train.py --synthetic images/s", ips, rows[0][2], rows[0][3]))
    return rows


def print_table(arch: str, rows: list[tuple[str, float, float, float]]) -> None:
    lower_is_better = ("latency", "step s", "RSS")
    for name, ours, eager, cl in rows:
        # Ratios are always "how many times better ours is": >1 means ours wins.
        flip = any(k in name for k in lower_is_better)
        ratio = [(t / ours if flip else ours / t) if t else None for t in (eager, cl)]
        cells = [f"{v:10.{2 if v < 10 else 1}f}" if v else f"{'':>10}" for v in (ours, eager, cl)]
        ratios = [f"{x:8.2f}x" if x is not None else f"{'':>9}" for x in ratio]
        print(f"{arch:16} {name:30} {''.join(cells)} {''.join(ratios)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-batch", type=int, default=64, help="the second eval batch size")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement")
    # A process's second step still faults the memory malloc then keeps in (resnet_jax.runtime.memory):
    # ~0.3 s for resnet50, about 1% of the mean over the 11 timed steps of 12.
    parser.add_argument("--trainer-steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="resnet18 at 64 px, 3 repeats")
    parser.add_argument("--skip-subprocess", action="store_true", help="no first-step/RSS/train.py")
    parser.add_argument("--rounds", type=int, default=2, help="train processes per side")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--train-worker", choices=TRAIN_SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.archs, args.image_size, args.repeats, args.trainer_steps = ["resnet18"], 64, 3, 3
        args.rounds = 1
    if args.worker:
        print(json.dumps(worker(args.worker, args.archs[0], args.batch, args.image_size)))
        return
    if args.train_worker:
        side, arch = args.train_worker, args.archs[0]
        print(json.dumps(train_worker(side, arch, args.batch, args.image_size, args.repeats)))
        return

    kept = keep_freed_memory()  # before any computation; the eval rows share this process
    import jax
    import torch

    from resnet_jax.ops.extension import conv_path

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {CORES} cores), torch "
          f"{torch.__version__} ({CORES} threads), batch {args.batch}, {args.image_size} px, "
          f"median of {args.repeats} (train: {args.rounds} processes per side); "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"convolutions: {conv_path()} (RESNET_JAX_CONV); malloc keeps freed memory: "
          f"{kept} (RESNET_JAX_KEEP_MEMORY)")  # fmt: skip
    print(f"{'arch':16} {'measure':30} {'ours':>10}{'torch':>10}{'torch CL':>10} "
          f"{'vs torch':>9}{'vs CL':>9}")  # fmt: skip
    for arch in args.archs:
        print_table(arch, bench_arch(arch, args))
    print("Ratios: ours relative to torch, >1 means ours is faster (or smaller); CL is "
          "channels_last. First step/RSS: torch column is its eager NCHW process.")  # fmt: skip


if __name__ == "__main__":
    main()
