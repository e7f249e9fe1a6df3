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
- train peak RSS (MB): VmHWM of each train process above (median over the rounds), so each
  side's memory sits beside its speed.
- init (s): model creation and its initial variables (ours drawn on the host, torchvision's
  constructor), in a fresh process.
- first step (s): a fresh process's first train step (trace, compile, run), with an empty and
  then a warm persistent compilation cache (the trainer's `enable_compilation_cache`); its peak
  RSS (3 steps, compilation included for ours) and the RSS after the imports beside it.
- predict.py end to end (s, MB): `predict.py IMAGE --weights W.msgpack` from process start to
  exit, with an empty and then a warm compilation cache, against the PyTorch tutorial's
  predict.py work (torchvision model, torch.load of a .pth, Resize(256), CenterCrop(224),
  softmax, every class's probability printed) run the same way; wall seconds and peak RSS.
- train.py --synthetic: images/s from the trainer's own metrics.jsonl (trainer overhead).
torch gets as many threads as JAX has cores.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
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


def release_kept_memory() -> None:
    """Give the memory this process's evaluations kept (malloc set up as train.py's) back to the
    system. A parent holding 4.4 GB of it made its child processes' steps twice as long, on both
    sides (ResNet-50's first step 14.5 s and torch's 7.8 s, against 8.7 s and 4.4 s once released;
    benchmarks/RESULTS.md)."""
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):  # glibc
        libc.malloc_trim(0)


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
    return {"step_s": timed([run], repeats)[0], "peak_rss_mb": memory_mb("VmHWM")}


def isolated_train_steps(
    arch: str, batch: int, size: int, repeats: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Median train-step seconds and peak RSS of each of TRAIN_SIDES, each in its own
    processes, alternating."""
    found: dict[str, list[dict]] = {side: [] for side in TRAIN_SIDES}
    for _ in range(rounds):
        for side in TRAIN_SIDES:
            cmd = ["--train-worker", side, "--repeats", str(repeats)]
            found[side].append(in_subprocess(cmd, arch, batch, size))
    return {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for side, runs in found.items()}  # fmt: skip


def worker(kind: str, arch: str, batch: int, size: int) -> dict:
    """Runs in a subprocess: first-step seconds and memory of one side."""
    if kind == "jax":
        keep_freed_memory()
        from resnet_jax.runtime.cache import enable_compilation_cache

        enable_compilation_cache()  # JAX_COMPILATION_CACHE_DIR (set by the parent) wins
        import jax  # noqa: F401  (the imports are part of the baseline)
    else:
        import torch  # noqa: F401
        import torchvision
    baseline = memory_mb("VmRSS")
    start = time.perf_counter()
    if kind == "jax":
        from resnet_jax.models.factory import create_model, init_variables

        init_variables(create_model(arch))
    else:
        getattr(torchvision.models, arch)()
    init_s = time.perf_counter() - start
    make = jax_train_step if kind == "jax" else lambda *a: torch_train_step(*a, False)
    run = make(arch, batch, size)
    steps = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        steps.append(time.perf_counter() - start)
    return {"steps_s": steps, "init_s": init_s, "peak_rss_mb": memory_mb("VmHWM"),
            "baseline_rss_mb": baseline}  # fmt: skip


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


# The PyTorch tutorial's predict.py without its figure: the image through Resize(256),
# CenterCrop(224), ToTensor and Normalize, the model from a .pth, every class's probability.
TORCH_PREDICT = """
import json, sys
import torch, torchvision
from PIL import Image
from torchvision import transforms
image, weights, class_indices, arch, threads = sys.argv[1:]
torch.set_num_threads(int(threads))
transform = transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
x = transform(Image.open(image).convert("RGB")).unsqueeze(0)
with open(class_indices) as f:
    classes = json.load(f)
model = getattr(torchvision.models, arch)(num_classes=len(classes))
model.load_state_dict(torch.load(weights, map_location="cpu"))
model.eval()
with torch.no_grad():
    probs = torch.softmax(model(x).squeeze(0), dim=0)
for i, p in enumerate(probs.tolist()):
    print(f"class: {classes[str(i)]:10}   prob: {p:.3}")
"""
FLOWERS = ("daisy", "dandelion", "roses", "sunflowers", "tulips")


def predict_files(arch: str, folder: Path) -> tuple[Path, Path, Path, Path]:
    """A 500x375 JPEG, our weights (.msgpack with the class names) and a torchvision model's
    .pth with the tutorial's class_indices.json, for a 5-class `arch`."""
    import torch
    import torchvision
    from PIL import Image

    from resnet_jax.models.factory import create_model, init_variables
    from resnet_jax.weights.io import save_variables
    from resnet_jax.weights.metadata import ModelMetadata

    image = folder / "image.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), np.uint8)
    Image.fromarray(pixels).save(image, quality=90)
    ours, theirs, indices = folder / f"{arch}.msgpack", folder / f"{arch}.pth", folder / "ci.json"
    metadata = ModelMetadata.default(arch, len(FLOWERS))
    metadata = dataclasses.replace(metadata, classes=FLOWERS)
    save_variables(ours, init_variables(create_model(arch, num_classes=len(FLOWERS))), metadata)
    torch.save(getattr(torchvision.models, arch)(num_classes=len(FLOWERS)).state_dict(), theirs)
    indices.write_text(json.dumps({str(i): name for i, name in enumerate(FLOWERS)}))
    return image, ours, theirs, indices


# Runs a command and prints its wall seconds and peak RSS as JSON. A small process of its own
# starts the command: a child spawned straight from this large one would report this process's
# RSS as its peak (Linux carries the peak of the memory it replaced at exec into ru_maxrss).
MEASURED_RUN = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "status": os.waitstatus_to_exitcode(status)}))
"""


def process_time_and_memory(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds of `cmd` from start to exit, and its peak RSS in MB."""
    run = [sys.executable, "-c", MEASURED_RUN, *cmd]
    out = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if found["status"] != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {out.stderr[-2000:]}")
    return found["seconds"], found["peak_rss_mb"]


def predict_rows(arch: str) -> list[tuple[str, float, float, float]]:
    """predict.py end to end, cold and warm compilation cache, against the tutorial's torch
    predict.py work; the torch side's runs alternate with ours."""
    with tempfile.TemporaryDirectory() as tmp:
        image, ours, theirs, indices = predict_files(arch, Path(tmp))
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(Path(tmp, "cache"))}
        our_cmd = [sys.executable, str(ROOT / "predict.py"), str(image), "--weights", str(ours)]
        their_cmd = [sys.executable, "-c", TORCH_PREDICT, str(image), str(theirs), str(indices),
                     arch, str(CORES)]  # fmt: skip
        runs = [process_time_and_memory(cmd, env) for _ in range(2) for cmd in (our_cmd, their_cmd)]
    (cold, _), (first, _), (warm, peak), (second, their_peak) = runs
    return [
        ("predict.py s (cold cache)", cold, first, 0),
        ("predict.py s (warm cache)", warm, second, 0),
        ("  predict.py peak RSS MB", peak, their_peak, 0),
    ]


# ---------------------------------------------------------------------------------------------
# The run


def bench_arch(arch: str, args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    """Rows (measure, ours, torch eager, torch channels_last) for one architecture."""
    b, s, r = args.batch, args.image_size, args.repeats
    rows = []
    train = isolated_train_steps(arch, b, s, r, args.rounds)
    same_malloc = ("jax", "torch+kept", "torch-cl+kept")
    ips = {side: b / found["step_s"] for side, found in train.items()}
    rss = {side: found["peak_rss_mb"] for side, found in train.items()}
    rows.append(("train images/s", *(ips[side] for side in TRAIN_SIDES[:3])))
    rows.append(("  images/s, malloc kept as ours", *(ips[side] for side in same_malloc)))
    rows.append(("  train peak RSS MB", *(rss[side] for side in TRAIN_SIDES[:3])))
    rows.append(("  same, malloc kept as ours", *(rss[side] for side in same_malloc)))
    for n in (args.batch, args.eval_batch):
        sides = [jax_predict(arch, n, s), torch_predict(arch, n, s, False)]
        sides.append(torch_predict(arch, n, s, True))
        rows.append((f"eval b{n} images/s", *(n / t for t in timed(sides, r))))
    sides = [jax_predict(arch, 1, s), torch_predict(arch, 1, s, False)]
    sides.append(torch_predict(arch, 1, s, True))
    rows.append(("b1 latency ms", *(1e3 * t for t in timed(sides, 4 * r))))
    del sides
    release_kept_memory()

    if not args.skip_subprocess:
        with tempfile.TemporaryDirectory() as cache:
            cold = in_subprocess(["--worker", "jax"], arch, b, s, cache)
            warm = in_subprocess(["--worker", "jax"], arch, b, s, cache)
        theirs = in_subprocess(["--worker", "torch"], arch, b, s, cache)
        first = theirs["steps_s"][0]
        rows.append(("init s (create + variables)", cold["init_s"], theirs["init_s"], 0))
        rows.append(("first step s (cold cache)", cold["steps_s"][0], first, 0))
        rows.append(("first step s (warm cache)", warm["steps_s"][0], first, 0))
        rows.append(("second step s (cold process)", cold["steps_s"][1], theirs["steps_s"][1], 0))
        rows.append(("  peak RSS MB (cold process)", cold["peak_rss_mb"], theirs["peak_rss_mb"], 0))
        rows.append(
            ("  RSS after imports MB", cold["baseline_rss_mb"], theirs["baseline_rss_mb"], 0)
        )
        rows += predict_rows(arch)
        ips = trainer_images_per_second(arch, b, s, args.trainer_steps)
        rows.append(("train.py --synthetic images/s", ips, rows[0][2], rows[0][3]))
    return rows


def print_table(arch: str, rows: list[tuple[str, float, float, float]]) -> None:
    for name, ours, eager, cl in rows:
        # Ratios are always "how many times better ours is": >1 means ours wins.
        flip = "images/s" not in name  # seconds, milliseconds, megabytes
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
