"""The fused Adam (training/fused_adam.py) against optax's and torch's, on one model's parameters.

    python benchmarks/adam.py                       # resnet34, batch 16, 224 px, 3 rounds
    python benchmarks/adam.py --archs resnet50 --rounds 5

Each round runs, in fresh processes one after another (so that load hits all alike):
- ours, twice: train.py's step with optax's Adam and with the fused one. Printed: trace and
  lowering, XLA's compilation, the fusions XLA compiled (each one loop of its own), the first and the median later step, and one optimizer update alone
  (jitted, on the parameters of the model, random gradients).
- torch: torch.optim.Adam's step on torchvision's model's parameters, with its default
  (foreach) implementation and with fused=True.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from functools import partial

import numpy as np

SIDES = ("optax", "fused", "torch")
CORES = len(os.sched_getaffinity(0))


def median_seconds(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(arch: str, fused: bool, batch: int, size: int) -> dict:
    """One fresh process's step with optax's Adam or the fused one."""
    from resnet_jax.runtime.memory import keep_freed_memory

    keep_freed_memory()
    import jax
    import jax.numpy as jnp
    import optax

    from resnet_jax.models.factory import create_model, init_variables
    from resnet_jax.training import fused_adam
    from resnet_jax.training.parallel import DataParallel
    from resnet_jax.training.steps import create_state, zero_totals

    tx = fused_adam.adam(1e-4) if fused else optax.chain(
        optax.add_decayed_weights(0.0), optax.adam(1e-4))  # fmt: skip
    dp = DataParallel()
    model = create_model(arch)
    state = jax.jit(lambda v: create_state(model.apply, tx, v), out_shardings=dp.replicated)(
        dp.replicate(init_variables(model))
    )
    rng = np.random.default_rng(0)
    data = dp.shard({"image": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
                     "label": rng.integers(0, 1000, batch).astype(np.int32),
                     "mask": np.ones(batch, bool)})  # fmt: skip
    totals = dp.replicate(zero_totals())
    start = time.perf_counter()
    lowered = dp.jit_train_step().trace(state, data, totals).lower()
    traced = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    text = compiled.as_text()
    fusions = len(re.findall(r" fusion\(", text))  # each fusion is one compiled loop
    steps = []
    for _ in range(4):
        start_step = time.perf_counter()
        state, out = compiled(state, data, totals)
        jax.block_until_ready(out)
        steps.append(time.perf_counter() - start_step)

    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)

    # The state is donated, as in the train step, so that updates in place need no copies.
    @partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, grads):
        return fused_adam.apply_update(tx, grads, opt_state, params)

    holder = [state.params, state.opt_state]

    def run():
        holder[:] = update(*holder, grads)
        jax.block_until_ready(holder)

    return {"trace_lower_s": traced - start, "compile_s": done - traced, "fusions": fusions,
            "first_step_s": steps[0], "step_s": statistics.median(steps[1:]),
            "update_s": median_seconds(run)}  # fmt: skip


def torch_side(arch: str) -> dict:
    """torch.optim.Adam's step alone on torchvision's parameters, foreach and fused."""
    import torch
    import torchvision

    torch.set_num_threads(CORES)
    params = list(getattr(torchvision.models, arch)().parameters())
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    found = {}
    for name, kwargs in (("torch_foreach_s", {}), ("torch_fused_s", {"fused": True})):
        opt = torch.optim.Adam(params, 1e-4, **kwargs)
        found[name] = median_seconds(opt.step)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet34"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        arch = args.archs[0]
        if args.worker == "torch":
            print(json.dumps(torch_side(arch)))
        else:
            print(json.dumps(ours(arch, args.worker == "fused", args.batch, args.image_size)))
        return
    for arch in args.archs:
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for _ in range(args.rounds):
            for side in SIDES:
                cmd = [sys.executable, __file__, "--worker", side, "--archs", arch,
                       "--batch", str(args.batch), "--image-size", str(args.image_size)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{arch}, batch {args.batch}, {args.image_size} px, {args.rounds} rounds "
              "(each value: every round, in order)")  # fmt: skip
        for side in ("optax", "fused"):
            for key in runs[side][0]:
                values = " / ".join(f"{r[key]:.3g}" for r in runs[side])
                print(f"  {side:6s} {key:14s} {values}")
        for key in runs["torch"][0]:
            print(f"  torch  {key:14s} " + " / ".join(f"{r[key]:.3g}" for r in runs["torch"]))


if __name__ == "__main__":
    main()
