"""load_torch_state_dict: bit-exact against torch, torch-free, and safe against malicious pickles."""

from __future__ import annotations

import contextlib
import json
import pickle
import signal
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision

from resnet_jax.runtime.errors import UserError
from resnet_jax.weights import torch_format
from resnet_jax.weights.torch_format import LEGACY_MAGIC_NUMBER, load_torch_state_dict
from resnet_jax.weights.torch_names import arch_from_torch_shapes
from tests.helpers import OldStorage, OldTensor, write_old_legacy


def resnet18_state_dict() -> dict[str, torch.Tensor]:
    """torchvision resnet18 weights with BatchNorm running stats that are not the defaults."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_()
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("num_batches_tracked"):
            value.fill_(int(torch.randint(1, 10_000, ())))
    return state


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype we read, plus views that share, slice and transpose one storage."""
    torch.manual_seed(1)
    base = torch.randn(5, 8)
    return {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(4).double(),
        "i64": torch.randint(-(2**40), 2**40, (3,)),
        "i32": torch.randint(-1000, 1000, (2, 2), dtype=torch.int32),
        "u8": torch.randint(0, 256, (6,), dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(12345),
        "empty": torch.zeros(0, 3),
        "base": base,
        "row": base[2],  # shares base's storage, offset 16
        "transposed": base.t(),  # non-contiguous
        "sliced": base[1:4, 2::3],  # offset and strides
        "param": torch.nn.Parameter(torch.randn(2)),
    }


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).contiguous().numpy()


def assert_bit_exact(arrays: dict[str, np.ndarray], tensors: dict[str, torch.Tensor]) -> None:
    assert sorted(arrays) == sorted(tensors)
    for key, tensor in tensors.items():
        want, got = as_numpy(tensor), arrays[key]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        assert got.tobytes() == want.tobytes(), key


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """Files written by torch (zip, legacy, safetensors) and the tensors each must give back."""
    folder = tmp_path_factory.mktemp("checkpoints")
    expected = {}
    for name, tensors in (("resnet18", resnet18_state_dict()), ("mixed", mixed_tensors())):
        torch.save(tensors, folder / f"{name}_zip.pth")
        torch.save(tensors, folder / f"{name}_legacy.pth", _use_new_zipfile_serialization=False)
        expected[f"{name}_zip.pth"] = expected[f"{name}_legacy.pth"] = tensors
    # safetensors refuses shared storage, so save independent copies.
    copies = {k: v.detach().clone().contiguous() for k, v in mixed_tensors().items()}
    safetensors.torch.save_file(copies, folder / "mixed.safetensors")
    expected["mixed.safetensors"] = copies
    return folder, expected


NO_TORCH_LOADER = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.modules["torchvision"] = None
import numpy as np
from resnet_jax.weights.torch_format import load_torch_state_dict
folder = sys.argv[1]
for name in sys.argv[2:]:
    arrays = load_torch_state_dict(f"{folder}/{name}")
    np.savez(f"{folder}/{name}.npz", **arrays)
assert sys.modules["torch"] is None
"""


def test_loads_bit_exact_without_torch(checkpoints):
    folder, expected = checkpoints
    subprocess.run(
        [sys.executable, "-c", NO_TORCH_LOADER, str(folder), *expected], check=True, timeout=120
    )
    for name, tensors in expected.items():
        with np.load(folder / f"{name}.npz") as loaded:
            assert_bit_exact(dict(loaded), tensors)


def test_zip_and_legacy_formats_are_what_the_test_thinks(checkpoints):
    folder, _ = checkpoints
    assert zipfile.is_zipfile(folder / "resnet18_zip.pth")
    with open(folder / "resnet18_legacy.pth", "rb") as f:
        assert pickle.load(f) == LEGACY_MAGIC_NUMBER  # the magic-number pickle comes first


def test_any_archive_folder_name(tmp_path):
    tensors = {"w": torch.randn(3, 2)}
    torch.save(tensors, tmp_path / "x.pth")
    renamed = tmp_path / "renamed.pth"
    with zipfile.ZipFile(tmp_path / "x.pth") as src, zipfile.ZipFile(renamed, "w") as dst:
        for info in src.infolist():
            dst.writestr("some_folder/" + info.filename.split("/", 1)[1], src.read(info))
    assert_bit_exact(load_torch_state_dict(renamed), tensors)


def test_big_endian_byteorder_record(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    torch.save({"w": torch.from_numpy(values)}, tmp_path / "x.pth")
    swapped = tmp_path / "big.pth"
    with zipfile.ZipFile(tmp_path / "x.pth") as src, zipfile.ZipFile(swapped, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            dst.writestr(info.filename, data)
    np.testing.assert_array_equal(load_torch_state_dict(swapped)["w"], values)


SMALL = {"fc.weight": torch.randn(2, 3), "fc.bias": torch.randn(2)}


@pytest.mark.parametrize(
    "wrapped",
    [
        {"state_dict": SMALL, "epoch": 3, "arch": "resnet18"},
        {"model_state_dict": SMALL, "best_acc1": torch.tensor(76.1)},
        {"model": SMALL},
        {"state_dict": {"module." + k: v for k, v in SMALL.items()}},  # nn.DataParallel
    ],
    ids=["state_dict", "model_state_dict", "model", "module_prefix"],
)
def test_unwraps_training_checkpoints(tmp_path, wrapped):
    torch.save(wrapped, tmp_path / "ckpt.pth")
    assert_bit_exact(load_torch_state_dict(tmp_path / "ckpt.pth"), SMALL)


def test_checkpoint_with_optimizer_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    ckpt = {"epoch": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    assert_bit_exact(load_torch_state_dict(tmp_path / "ckpt.pth"), model.state_dict())


def test_no_state_dict_inside(tmp_path):
    torch.save({"epoch": 3, "notes": "no tensors"}, tmp_path / "x.pth")
    with pytest.raises(UserError, match="holds no state dict"):
        load_torch_state_dict(tmp_path / "x.pth")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated
def test_torchscript_archive(tmp_path):
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
    with pytest.raises(UserError, match="TorchScript"):
        load_torch_state_dict(tmp_path / "scripted.pt")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_torch_state_dict(tmp_path / "nope.pth")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("hello, I am a text file\n")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))  # a zip without data.pkl
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    for name in ("notes.pth", "arrays.npz", "plain.pkl"):
        with pytest.raises(UserError, match="not a PyTorch checkpoint"):
            load_torch_state_dict(tmp_path / name)


@pytest.mark.parametrize("name", ["resnet18_zip.pth", "resnet18_legacy.pth", "mixed.safetensors"])
def test_truncated_file(checkpoints, tmp_path, name):
    folder, _ = checkpoints
    data = (folder / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UserError, match="truncated"):
        load_torch_state_dict(cut)


def test_safetensors_by_content_and_bad_header(tmp_path):
    copies = {"w": torch.randn(2, 2)}
    safetensors.torch.save_file(copies, tmp_path / "weights.bin")
    assert_bit_exact(load_torch_state_dict(tmp_path / "weights.bin"), copies)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
    data = struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8
    (tmp_path / "short.safetensors").write_bytes(data)
    with pytest.raises(UserError, match="damaged"):
        load_torch_state_dict(tmp_path / "short.safetensors")


# --- hostile files: cycles, declared sizes, compression bombs, unsupported types ---


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail a test that would hang, instead of hanging the suite."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def self_containing() -> dict:
    d = {}
    d["state_dict"] = d
    return d


def two_dict_cycle() -> dict:
    a: dict = {}
    a["state_dict"] = {"model": a}
    return a


def deep_wrappers() -> dict:
    obj = SMALL
    for _ in range(20):
        obj = {"state_dict": obj}
    return obj


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "make, message",
    [
        (self_containing, "a cycle through"),
        (two_dict_cycle, "a cycle through"),
        (deep_wrappers, "levels deep"),
    ],
)
def test_wrapper_cycles_and_deep_nesting_are_refused(tmp_path, make, message, legacy):
    torch.save(make(), tmp_path / "w.pth", _use_new_zipfile_serialization=not legacy)
    with deadline(10), pytest.raises(UserError, match=message):
        load_torch_state_dict(tmp_path / "w.pth")


def test_many_views_of_one_storage_are_bounded_in_total(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_format, "MAX_TOTAL_ELEMENTS", 1000)
    storage = OldStorage("root", 100)
    obj = {f"w{i}": OldTensor(storage, 0, (100,), (1,)) for i in range(11)}
    write_old_legacy(tmp_path / "views.pth", obj, {"root": np.zeros(100, np.float32)})
    with pytest.raises(UserError, match="1,100 tensor elements"):
        load_torch_state_dict(tmp_path / "views.pth")


def replace_member(src: Path, dst: Path, suffix: str, data: bytes) -> None:
    """Copy a zip, replacing the member whose name ends with `suffix` by deflated `data`."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            if info.filename.endswith(suffix):
                b.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
            else:
                b.writestr(info, a.read(info))


@pytest.mark.parametrize("member", ["/data/0", "/data.pkl"])
def test_compressed_member_is_never_inflated_whole(tmp_path, member, monkeypatch):
    monkeypatch.setattr(torch_format, "MAX_PICKLE_BYTES", 1 << 20)
    torch.save({"w": torch.zeros(4)}, tmp_path / "w.pth")
    # 64 MiB of zeros deflate to ~64 KB; the reader must stop after the bytes it expects.
    replace_member(tmp_path / "w.pth", tmp_path / "bomb.pth", member, bytes(64 << 20))
    assert (tmp_path / "bomb.pth").stat().st_size < 1 << 20
    with pytest.raises(UserError, match="damaged.*larger than"):
        load_torch_state_dict(tmp_path / "bomb.pth")


def test_names_and_shapes_are_checked_before_tensors_are_read(tmp_path):
    obj = {"w": OldTensor(OldStorage("root", 4), 0, (4,), (1,))}
    write_old_legacy(tmp_path / "w.pth", obj, {"root": np.zeros(4, np.float32)})
    seen = []

    def check(shapes):
        seen.append(shapes)
        raise UserError("refused by the check")

    reads = []
    real_frombuffer = np.frombuffer
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np, "frombuffer", lambda *a, **k: reads.append(1) or real_frombuffer(*a, **k))
        with pytest.raises(UserError, match="refused by the check"):
            load_torch_state_dict(tmp_path / "w.pth", check=check)
    assert seen == [{"w": (4,)}] and not reads


def write_safetensors_header(path: Path, header: dict, data_size: int) -> None:
    """A .safetensors file with `header` and `data_size` bytes of (sparse, unwritten) zeros."""
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(8 + len(encoded) + data_size)


def test_safetensors_names_are_checked_before_tensors_are_read(tmp_path):
    # A name no ResNet has, over 256 MiB of data: only the header may be read.
    entry = {"dtype": "F32", "shape": [1 << 26], "data_offsets": [0, 1 << 28]}
    write_safetensors_header(tmp_path / "w.safetensors", {"junk": entry}, 1 << 28)
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="'junk'"):
            load_torch_state_dict(tmp_path / "w.safetensors", check=arch_from_torch_shapes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_safetensors_header_longer_than_any_resnet_needs_is_refused(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b'{"w": {}}')
    with pytest.raises(UserError, match=r"header of 1,099,511,627,776 bytes, more than"):
        load_torch_state_dict(tmp_path / "w.safetensors")


def test_unreadable_file_and_folder_are_one_line(tmp_path, monkeypatch):
    torch.save(SMALL, tmp_path / "w.pth")
    with pytest.raises(UserError, match="is a folder"):
        load_torch_state_dict(tmp_path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr(torch_format, "open", denied, raising=False)
    with pytest.raises(UserError, match="Cannot read .*Permission denied"):
        load_torch_state_dict(tmp_path / "w.pth")


@pytest.mark.parametrize("dtype", [torch.uint16, torch.complex64, torch.float8_e4m3fn], ids=str)
def test_unsupported_safetensors_dtypes_are_named(tmp_path, dtype):
    safetensors.torch.save_file({"w": torch.zeros(2, dtype=dtype)}, tmp_path / "w.safetensors")
    with pytest.raises(UserError, match=r"'w' as (U16|C64|F8_E4M3)\b.*convert it") as error:
        load_torch_state_dict(tmp_path / "w.safetensors")
    assert "never needs" not in str(error.value)
