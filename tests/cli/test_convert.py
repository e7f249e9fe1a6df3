"""convert_weights.py end to end in subprocesses: file to file and back to torchvision, a folder,
one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision

pytestmark = pytest.mark.slow  # every test runs convert_weights.py in subprocesses


def run_convert_cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(__file__).resolve().parents[2] / "convert_weights.py"
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_convert_weights_cli_pth_to_msgpack_to_safetensors(tmp_path):
    model = torchvision.models.resnet18(num_classes=7)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    done = run_convert_cli(str(tmp_path / "r18.pth"), str(tmp_path / "r18.msgpack"))
    assert done.returncode == 0, done.stderr
    assert "resnet18, 11,180,103 parameters" in done.stdout
    done = run_convert_cli(
        str(tmp_path / "r18.msgpack"), str(tmp_path / "r18.safetensors"), "--arch", "resnet18"
    )
    assert done.returncode == 0, done.stderr
    back = safetensors.torch.load_file(tmp_path / "r18.safetensors")
    fresh = torchvision.models.resnet18(num_classes=7)
    fresh.load_state_dict(back, strict=True)
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[key], value), key


def test_convert_weights_cli_errors_are_one_line(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    for args, message in [
        (("missing.pth", "out.msgpack"), "does not exist"),
        (
            (str(tmp_path / "r18.pth"), str(tmp_path / "out.msgpack"), "--arch", "resnet34"),
            "do not fit resnet34",
        ),
        ((str(tmp_path / "r18.pth"), str(tmp_path / "out.bin")), "use a .msgpack or .safetensors"),
    ]:
        done = run_convert_cli(*args)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out.msgpack").exists()


def test_convert_weights_cli_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), src / "r18.pth")
    (src / "broken.pth").write_bytes(b"not a checkpoint")
    done = run_convert_cli(str(src), str(tmp_path / "out"), "--format", ".safetensors")
    assert done.returncode == 2, done.stderr
    line = f"{src / 'r18.pth'} -> {tmp_path / 'out' / 'r18.safetensors'}: resnet18, 11,178,051"
    assert done.stdout.strip().splitlines() == [line + " parameters"]
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "broken.pth" in errors[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r18.safetensors"]
