"""The three programs on hostile and damaged inputs, under a 4 GiB address-space limit: one
`error:` line (or one `skipped:` line per bad image) and the documented exit code, never a
traceback and never more memory than the limit."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from flax import serialization
from PIL import Image

from tests.helpers import OldStorage, OldTensor, write_old_legacy

REPO = Path(__file__).resolve().parents[2]
MEMORY_LIMIT = 4 << 30


# Sets the limit in the child itself, before it imports anything: `preexec_fn` would fork this
# multithreaded (JAX) process, which can deadlock.
LIMITED = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_limited(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repository root, its address space limited to 4 GiB."""
    return subprocess.run(
        [sys.executable, "-c", LIMITED, str(MEMORY_LIMIT), script, *args], check=False,
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def assert_one_error(result: subprocess.CompletedProcess, what: str) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 1, (what, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, (what, result.stderr[-2000:])
    assert "MemoryError" not in result.stderr, (what, result.stderr[-2000:])  # bounded, not lucky
    assert len([line for line in lines if line.startswith("error:")]) == 1, (what, lines)


def write_safetensors(path: Path, header: dict, data_size: int) -> None:
    """A .safetensors header followed by `data_size` sparse (never written) bytes."""
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(8 + len(encoded) + data_size)


def bad_weights(folder: Path) -> dict[str, Path]:
    """One file per class of bad weights file, each refused before it can use much memory."""
    files = {}
    cycle: dict = {}
    cycle["state_dict"] = cycle
    torch.save(cycle, files.setdefault("wrapper cycle", folder / "cycle.pth"))
    # 3 * 2**28 elements declared with stride 0 over a one-element storage.
    tensor = OldTensor(OldStorage("root", 1), 0, (3, 1 << 28), (0, 0))
    files["stride 0"] = folder / "stride0.pth"
    write_old_legacy(files["stride 0"], {"w": tensor}, {"root": np.zeros(1, np.float32)})
    torch.save({"w": torch.zeros(4)}, folder / "small.pth")
    files["zip bomb"] = folder / "bomb.pth"
    with (
        zipfile.ZipFile(folder / "small.pth") as src,
        zipfile.ZipFile(files["zip bomb"], "w") as dst,
    ):
        for info in src.infolist():
            data = bytes(256 << 20) if info.filename.endswith("/data/0") else src.read(info)
            dst.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    data = (folder / "small.pth").read_bytes()
    (files.setdefault("truncated pth", folder / "truncated.pth")).write_bytes(
        data[: len(data) // 2]
    )
    files["huge header"] = folder / "header.safetensors"
    files["huge header"].write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    # 6 GiB of tensor data, more than the memory limit, that a reader must never load.
    entry = {"dtype": "F32", "shape": [3 << 29], "data_offsets": [0, 6 << 30]}
    files["6 GiB safetensors"] = folder / "big.safetensors"
    write_safetensors(files["6 GiB safetensors"], {"fc.weight": entry}, 6 << 30)
    files["damaged msgpack"] = folder / "damaged.msgpack"
    files["damaged msgpack"].write_bytes(b"\x85\xa6params\xde\xff\xff")
    odd = {"params": {"fc": {"kernel": np.zeros((2, 2), np.float32)}}, "batch_stats": 5}
    (files.setdefault("odd tree", folder / "odd.msgpack")).write_bytes(
        serialization.msgpack_serialize(odd)
    )
    return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2)
    torch.save(model.state_dict(), folder / "good.pth")
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    torch.save(model.state_dict(), folder / "nan.pth")
    (folder / "classes.json").write_text('{"0": "a", "1": "b"}')
    images = folder / "images" / "train"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (folder / "images" / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (40 * i, 200, 0)).save(
                    folder / "images" / split / name / f"{i}.png"
                )
    Image.new("RGB", (100_000, 1)).save(folder / "thin.png")  # 1:100000: a 256x25.6M resize
    data = (images / "a" / "0.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    env = dict(os.environ, JAX_PLATFORMS="cpu", RESNET_JAX_CACHE=str(folder / "cache"))
    return folder, bad_weights(folder), env


@pytest.mark.slow
def test_every_program_on_bad_input_is_one_line_within_4_gib(inputs, tmp_path):
    folder, weights, env = inputs
    for what, path in weights.items():
        assert_one_error(run_limited("convert_weights.py", str(path), str(tmp_path / "w.msgpack"),
                                     env=env), f"convert {what}")  # fmt: skip
        args = ["--weights", str(path), str(folder / "thin.png")]
        assert_one_error(run_limited("predict.py", *args, env=env), f"predict {what}")
    assert not list(tmp_path.iterdir())  # nothing written, not even half
    classes = ["--class-indices", str(folder / "classes.json")]
    nan = run_limited("predict.py", "--weights", str(folder / "nan.pth"), *classes,
                      str(folder / "thin.png"), env=env)  # fmt: skip
    assert_one_error(nan, "predict with NaN weights")
    train = ["--arch", "resnet18", "--data-dir", str(folder / "images"), "--epochs", "1",
             "--batch-size", "2", "--image-size", "32", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    assert_one_error(
        run_limited("train.py", *train, "--weights", str(weights["stride 0"]), env=env),
        "train with stride-0 weights",
    )
    # Bad images are skipped, each named on one line, with exit code 2.
    images = [str(folder / name) for name in ("thin.png", "truncated.png")]
    images.append(str(folder / "images" / "val" / "a" / "0.png"))
    result = run_limited("predict.py", "--weights", str(folder / "good.pth"), *classes, *images,
                         env=env)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 2 and "thin.png" in skipped[0] and "truncated.png" in skipped[1]
