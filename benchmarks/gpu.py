"""Training and eval throughput on one GPU, model FLOP utilisation, and the original task's epochs.

    bash benchmarks/gpu.sh            # one H200: under 8 minutes
    bash benchmarks/gpu.sh --tiny     # the same code paths on a CPU in about a minute

1. ResNet-50 and ResNet-34 training steps (train.py's: `DataParallel.jit_train_step`, Adam,
   uint8 images made on the device) in bfloat16 and float32 at batch 256, 224 px: images/s and
   MFU = FLOPs of the step (XLA's count of the unoptimised program) / time / peak, with H200
   peaks 989 TFLOP/s dense bf16 and 494 TF32 (float32 matmuls run in TF32 on GPUs by default);
   MFU(pub) counts 3 x the published forward FLOPs instead (R50 4.09, R34 3.66 GMACs/image).
2. Eval steps (`jit_eval_step`) at the same batch: images/s.
3. The original task: `train.py --arch resnet34 --weights none` for 3 epochs on a generated
   tf_flowers-sized folder (3,670 JPEGs of 500x375 in 5 classes, 10% held out), 224 px, batch
   16, 16 decoding workers: seconds per epoch from its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from resnet_jax.data.synthetic import synthetic_batches
from resnet_jax.models.factory import create_model, init_variables
from resnet_jax.training.optim import make_optimizer
from resnet_jax.training.parallel import DataParallel
from resnet_jax.training.steps import create_state, zero_totals

ROOT = Path(__file__).resolve().parent.parent
PEAK_FLOPS = {"bfloat16": 989e12, "float32": 494e12}  # H200 SXM, dense
FORWARD_MACS = {"resnet50": 4.09e9, "resnet34": 3.66e9, "resnet18": 1.81e9}  # per 224 px image
FLOWERS = {"daisy": 633, "dandelion": 898, "roses": 641, "sunflowers": 699, "tulips": 799}


def step_flops(lowered: jax.stages.Lowered) -> float | None:
    """FLOPs XLA counts in a lowered program, or None if this jax cannot say."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001  (not every jax/backend implements it)
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) or None


def throughput(arch: str, dtype: str, batch: int, size: int, steps: int) -> dict:
    """Train and eval images/s (and the train step's FLOPs) on synthetic device data."""
    dp = DataParallel()
    model = create_model(arch, dtype=getattr(jnp, dtype))
    variables = init_variables(model)  # drawn on the host: no model-sized graph compiled
    tx = make_optimizer("adam", 1e-4, 0.0)
    make_state = jax.jit(lambda v: create_state(model.apply, tx, v), out_shardings=dp.replicated)
    state = make_state(variables)
    batches = list(synthetic_batches(dp.batch, jax.random.key(1), 2, batch, size, 1000))
    totals = dp.replicate(zero_totals())
    train_step, eval_step = dp.jit_train_step(), dp.jit_eval_step()
    flops = step_flops(train_step.lower(state, batches[0], totals))

    start = time.perf_counter()
    state, t = train_step(state, batches[0], totals)
    jax.block_until_ready(t)
    compile_s = time.perf_counter() - start
    for i in range(3):  # settle (autotuning, allocator)
        state, t = train_step(state, batches[i % 2], t)
    jax.block_until_ready(t)
    start = time.perf_counter()
    for i in range(steps):  # no host sync inside: as in the trainer
        state, t = train_step(state, batches[i % 2], t)
    jax.block_until_ready(t)
    train_s = (time.perf_counter() - start) / steps

    e = eval_step(state, batches[0], totals)
    for i in range(3):
        e = eval_step(state, batches[i % 2], e)
    jax.block_until_ready(e)
    start = time.perf_counter()
    for i in range(steps):
        e = eval_step(state, batches[i % 2], e)
    jax.block_until_ready(e)
    eval_s = (time.perf_counter() - start) / steps
    return {"train": batch / train_s, "eval": batch / eval_s, "step_s": train_s,
            "flops": flops, "compile_s": compile_s}  # fmt: skip


def write_image(job: tuple[str, int]) -> None:
    """One photo-sized JPEG: smooth colour fields plus noise (decodes like a real photo)."""
    path, seed = job
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((500, 375), Image.Resampling.BICUBIC), np.int16)
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_flowers(root: Path, scale: float, workers: int) -> int:
    """A tf_flowers-shaped ImageFolder (class sizes times `scale`); returns the image count."""
    jobs = []
    for name, count in FLOWERS.items():
        (root / name).mkdir(parents=True)
        jobs += [
            (str(root / name / f"{i:04d}.jpg"), len(jobs) + i) for i in range(round(count * scale))
        ]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:  # JAX has threads
        pool.map(write_image, jobs, chunksize=16)
    return len(jobs)


def seed_task(args: argparse.Namespace) -> list[dict]:
    """train.py on the generated folder; its metrics.jsonl records, one per epoch."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp, "flowers"), Path(tmp, "run")
        start = time.perf_counter()
        n = make_flowers(data, args.flowers_scale, args.workers)
        print(f"generated {n} JPEGs in {time.perf_counter() - start:.1f} s", flush=True)
        cmd = [sys.executable, str(ROOT / "train.py"), "--arch", "resnet34", "--weights", "none"]
        cmd += ["--data-dir", str(data), "--val-fraction", "0.1", "--epochs", str(args.epochs)]
        cmd += ["--image-size", str(args.seed_size), "--workers", str(args.workers)]
        cmd += ["--output-dir", str(out)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        lines = Path(out, "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run of every code path")
    parser.add_argument("--archs", nargs="+", default=["resnet50", "resnet34"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--flowers-scale", type=float, default=1.0)
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.image_size, args.steps, args.epochs = 8, 32, 2, 1
        args.seed_size, args.workers, args.flowers_scale = 32, 2, 0.02

    start = time.perf_counter()
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {len(jax.devices())} x {device.device_kind} ({device.platform})"
    )
    print(f"{'arch':10} {'dtype':9} {'train img/s':>12} {'eval img/s':>11} {'step ms':>8} "
          f"{'TFLOP/step':>10} {'MFU':>6} {'MFU(pub)':>9} {'compile s':>9}")  # fmt: skip
    for arch in args.archs:
        for dtype in ("bfloat16", "float32"):
            r = throughput(arch, dtype, args.batch, args.image_size, args.steps)
            analytic = 6 * FORWARD_MACS[arch] * (args.image_size / 224) ** 2 * args.batch
            on_gpu = device.platform == "gpu"
            mfu = [f / r["step_s"] / PEAK_FLOPS[dtype] if on_gpu and f else None
                   for f in (r["flops"], analytic)]  # fmt: skip
            cells = [f"{m:6.1%}" if m is not None else f"{'n/a':>6}" for m in mfu]
            tflop = f"{r['flops'] / 1e12:10.3f}" if r["flops"] else f"{'n/a':>10}"
            print(f"{arch:10} {dtype:9} {r['train']:12.1f} {r['eval']:11.1f} "
                  f"{1e3 * r['step_s']:8.1f} {tflop} {cells[0]} {cells[1]:>9} "
                  f"{r['compile_s']:9.1f}", flush=True)  # fmt: skip
    print(f"throughput done after {time.perf_counter() - start:.0f} s", flush=True)

    records = seed_task(args)
    for r in records:
        first = r.get("first_step_seconds")
        print(f"original task epoch {r['epoch']}: {r['seconds']:.1f} s, "
              f"{r['images_per_second'] or 0:.0f} train images/s, val_accuracy "
              f"{r['val_accuracy']:.3f}" + (f" (first step {first:.1f} s)" if first else ""))  # fmt: skip
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
