"""save_variables / load_variables round trips, atomic writes, and verified downloads."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.torch
import torch
import torchvision
from flax import serialization
from flax.core import freeze
from flax.training import train_state

from resnet_jax.runtime.errors import UserError
from resnet_jax.weights import io as weights
from resnet_jax.weights.io import WEIGHT_URLS, load_variables, pretrained_path, save_variables
from resnet_jax.weights.torch_names import torch_to_flax
from tests.helpers import flat


def assert_trees_equal(a, b) -> None:
    assert isinstance(a, Mapping) == isinstance(b, Mapping)  # FrozenDict is a Mapping
    if isinstance(a, Mapping):
        assert sorted(a) == sorted(b)
        for k in a:
            assert_trees_equal(a[k], b[k])
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert a.tobytes() == b.tobytes()


def torchvision_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_()
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
    return state


def numpy_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items()}


SMALL = {
    "params": {"conv1": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 2, 3, 2)}},
    "batch_stats": {"bn1": {"mean": np.ones(2, np.float32), "var": np.full(2, 2.0)}},
}


def test_weight_urls_are_torchvisions_imagenet1k_v1():
    assert len(WEIGHT_URLS) == 10
    for arch, url in WEIGHT_URLS.items():
        assert url == torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url


def test_msgpack_round_trip(tmp_path):
    variables = {
        "params": {"fc": {"kernel": jnp.ones((3, 2), jnp.bfloat16), "bias": jnp.zeros(2)}},
        "batch_stats": freeze({"bn1": {"mean": np.arange(4, dtype=np.float64)}}),
    }
    save_variables(tmp_path / "v.msgpack", variables)
    assert_trees_equal(load_variables(tmp_path / "v.msgpack"), variables)


def test_safetensors_loads_into_torchvision_and_back(tmp_path):
    state = torchvision_resnet18()
    variables = torch_to_flax(numpy_state(state))
    save_variables(tmp_path / "r18.safetensors", variables)

    loaded = safetensors.torch.load_file(tmp_path / "r18.safetensors")
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(loaded, strict=True)  # every key, num_batches_tracked included
    for key, tensor in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, state[key]), key

    assert_trees_equal(load_variables(tmp_path / "r18.safetensors"), variables)
    assert loaded["bn1.num_batches_tracked"].shape == torch.Size([])  # torchvision's shape


@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_load_variables_from_torch_checkpoint(tmp_path, suffix):
    state = torchvision_resnet18()
    torch.save(state, tmp_path / f"r18{suffix}")
    assert_trees_equal(load_variables(tmp_path / f"r18{suffix}"), torch_to_flax(numpy_state(state)))


def test_unsupported_suffix_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match=r"\.msgpack or \.safetensors"):
        save_variables(tmp_path / "v.npz", SMALL)
    assert not (tmp_path / "v.npz").exists()
    (tmp_path / "v.h5").write_bytes(b"x")
    with pytest.raises(UserError, match="use a .msgpack"):
        load_variables(tmp_path / "v.h5")
    with pytest.raises(UserError, match="does not exist"):
        load_variables(tmp_path / "missing.msgpack")
    save_variables(tmp_path / "v.msgpack", SMALL)
    data = (tmp_path / "v.msgpack").read_bytes()
    (tmp_path / "cut.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="damaged"):
        load_variables(tmp_path / "cut.msgpack")
    save_variables(tmp_path / "other.msgpack", {"opt_state": {"mu": np.zeros(2)}})
    with pytest.raises(UserError, match="no 'params'"):
        load_variables(tmp_path / "other.msgpack")


class TrainStateWithStats(train_state.TrainState):
    batch_stats: Any = None


def test_msgpack_of_a_whole_train_state_gives_its_variables(tmp_path):
    state = TrainStateWithStats.create(
        apply_fn=None,
        params=SMALL["params"],
        tx=optax.sgd(0.1, momentum=0.9),
        batch_stats=SMALL["batch_stats"],
    )
    (tmp_path / "state.msgpack").write_bytes(serialization.to_bytes(state))
    assert_trees_equal(load_variables(tmp_path / "state.msgpack"), SMALL)


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"params": SMALL["params"], "batch_stats": 5}, "int at 'batch_stats'"),
        ({"params": {1: {"kernel": np.zeros(2)}}}, "non-string key 1 in 'params'"),
        ({"params": {"fc": {2: np.zeros(2)}}}, "non-string key 2 in 'params/fc'"),
        ({"params": {"fc": {"bias": "text"}}}, "str at 'params/fc/bias'"),
    ],
    ids=["number", "int_key", "nested_int_key", "string_leaf"],
)
def test_odd_msgpack_trees_are_refused_in_one_line(tmp_path, tree, message):
    (tmp_path / "odd.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(UserError, match=message):
        load_variables(tmp_path / "odd.msgpack")


def test_suffixes_are_case_insensitive(tmp_path):
    state = torchvision_resnet18()
    torch.save(state, tmp_path / "r18.PTH")
    variables = load_variables(tmp_path / "r18.PTH")
    assert_trees_equal(variables, torch_to_flax(numpy_state(state)))
    for name in ("r18.SafeTensors", "r18.MSGPACK"):
        save_variables(tmp_path / name, variables)
        assert_trees_equal(load_variables(tmp_path / name), variables)


def test_folder_and_unreadable_weights_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "weights.msgpack").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        load_variables(tmp_path / "weights.msgpack")
    save_variables(tmp_path / "v.msgpack", SMALL)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UserError, match="Cannot read .*Permission denied"):
        load_variables(tmp_path / "v.msgpack")


def test_torch_names_are_checked_before_tensors_are_read(tmp_path):
    state = dict(torchvision_resnet18())
    state["classifier.weight"] = torch.zeros(10, 512)
    torch.save(state, tmp_path / "w.pth")
    # Damage the storages: a reader that got past the names would report the damage.
    damaged = zipfile.ZipFile(tmp_path / "x.pth", "w")
    with zipfile.ZipFile(tmp_path / "w.pth") as src, damaged as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:4] if "/data/" in info.filename else data)
    with pytest.raises(UserError, match="'classifier.weight' is not part of a torchvision ResNet"):
        load_variables(tmp_path / "x.pth")


@pytest.mark.parametrize("dtype", [np.complex64, np.int32, jnp.float8_e4m3fn], ids=str)
def test_convert_refuses_weights_that_are_not_floating_point(tmp_path, dtype):
    variables = torch_to_flax(numpy_state(torchvision_resnet18()))
    variables["params"]["conv1"]["kernel"] = variables["params"]["conv1"]["kernel"].astype(dtype)
    save_variables(tmp_path / "odd.msgpack", variables)
    with pytest.raises(UserError, match=r"not floating point \(conv1\.weight is "):
        weights.convert_file(tmp_path / "odd.msgpack", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("suffix", [".msgpack", ".safetensors"])
def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"v{suffix}"
    save_variables(path, SMALL)
    before = path.read_bytes()

    class DiskFull:
        """Writes half of what it is given, then fails like a full disk."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    real_atomic_write = weights.atomic_write

    @contextlib.contextmanager
    def failing_atomic_write(target, mode="wb"):
        with real_atomic_write(target, mode) as f:
            yield DiskFull(f)

    monkeypatch.setattr(weights, "atomic_write", failing_atomic_write)
    changed = {**SMALL, "params": {"conv1": {"kernel": -SMALL["params"]["conv1"]["kernel"]}}}
    with pytest.raises(UserError, match=r"Cannot write .*: the disk is full; free some space"):
        save_variables(path, changed)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left


# --- downloads from a local HTTP server ---


@pytest.fixture
def caches(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Point our cache and torch hub's at empty folders."""
    ours, hub = tmp_path / "cache", tmp_path / "torch_home" / "hub" / "checkpoints"
    monkeypatch.setenv("RESNET_JAX_CACHE", str(ours))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return ours, hub


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving the files put in the yielded folder."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    httpd.shutdown()
    httpd.server_close()


def hashed_name(data: bytes, arch: str = "resnet18") -> str:
    return f"{arch}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_verify_reuse_and_load(caches, server, tmp_path):
    ours, _ = caches
    base, folder = server
    state = torchvision_resnet18()
    torch.save(state, tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    name = hashed_name(data)
    (folder / name).write_bytes(data)

    path = pretrained_path("resnet18", progress=False, url=f"{base}/{name}")
    assert path == ours / name and path.read_bytes() == data
    assert sorted(p.name for p in ours.iterdir()) == [name]  # no temp file left
    assert_trees_equal(load_variables(path), torch_to_flax(numpy_state(state)))

    (folder / name).unlink()  # a second download would now fail with 404
    assert pretrained_path("resnet18", progress=False, url=f"{base}/{name}") == path


def test_download_bar_only_on_a_terminal_or_for_large_files(caches, server, monkeypatch, capsys):
    base, folder = server
    data = b"weights" * 1000
    name = hashed_name(data)
    (folder / name).write_bytes(data)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    pretrained_path("resnet18", url=f"{base}/{name}", cache_dir=caches[0] / "a")
    assert capsys.readouterr().err == ""  # a small file into a log: no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    pretrained_path("resnet18", url=f"{base}/{name}", cache_dir=caches[0] / "b")
    assert f"{name}: 100%" in capsys.readouterr().err


def test_explicit_cache_dir_and_damaged_cached_file_is_replaced(caches, server, tmp_path):
    base, folder = server
    data = b"weights" * 1000
    name = hashed_name(data)
    (folder / name).write_bytes(data)
    cache = tmp_path / "elsewhere"
    cache.mkdir()
    (cache / name).write_bytes(data[:100])  # an interrupted download from long ago
    path = pretrained_path("resnet18", cache_dir=cache, progress=False, url=f"{base}/{name}")
    assert path == cache / name and path.read_bytes() == data


def test_reuses_torch_hub_cache(caches):
    _, hub = caches
    data = b"from torch hub"
    name = hashed_name(data)
    hub.mkdir(parents=True)
    (hub / name).write_bytes(data)
    url = f"http://127.0.0.1:{free_port()}/{name}"  # nothing listens: must not be needed
    assert pretrained_path("resnet18", progress=False, url=url) == hub / name


def test_hash_mismatch_deletes_the_download(caches, server):
    ours, _ = caches
    base, folder = server
    data = b"tampered"
    assert not hashlib.sha256(data).hexdigest().startswith("00000000")
    (folder / "resnet18-00000000.pth").write_bytes(data)
    with pytest.raises(UserError, match="sha256.*deleted.*--weights PATH"):
        pretrained_path("resnet18", progress=False, url=f"{base}/resnet18-00000000.pth")
    assert list(ours.iterdir()) == []


def test_http_error_names_url(caches, server):
    base, _ = server
    url = f"{base}/resnet18-12345678.pth"
    with pytest.raises(UserError, match=f"{url}.*--weights PATH"):
        pretrained_path("resnet18", progress=False, url=url)


def test_unreachable_server_fails_fast(caches):
    url = f"http://127.0.0.1:{free_port()}/resnet18-12345678.pth"
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        pretrained_path("resnet18", progress=False, url=url)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert url in message and "--weights PATH" in message and "\n" not in message


def test_unknown_arch_and_unhashed_name(caches):
    with pytest.raises(UserError, match="resnet18, resnet34"):
        pretrained_path("resnet19")
    with pytest.raises(UserError, match="sha256 prefix"):
        pretrained_path("resnet18", url="http://127.0.0.1:1/weights.pth")


def run_convert_cli(*args: str) -> subprocess.CompletedProcess:
    script = Path(__file__).resolve().parents[2] / "convert_weights.py"
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_convert_folder_converts_each_file_and_reports_the_bad_ones(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    model = torchvision.models.resnet18(num_classes=3)
    torch.save(model.state_dict(), src / "a.pth")
    save_variables(src / "b.msgpack", load_variables(src / "a.pth"))
    save_variables(src / "a.safetensors", load_variables(src / "a.pth"))  # a.msgpack again
    (src / "broken.pth").write_bytes(b"not a checkpoint")
    (src / "notes.txt").write_text("not weights")
    results = list(weights.convert_folder(src, tmp_path / "out", ".msgpack"))
    assert [(s.name, d.name) for s, d, _ in results] == [
        ("a.pth", "a.msgpack"),
        ("a.safetensors", "a.msgpack"),
        ("b.msgpack", "b.msgpack"),
        ("broken.pth", "broken.msgpack"),
    ]
    outcome = {s.name: r for s, _, r in results}
    assert outcome["a.pth"] == ("resnet18", 11_178_051) == outcome["b.msgpack"]
    assert "would overwrite" in str(outcome["a.safetensors"])
    assert isinstance(outcome["broken.pth"], UserError)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.msgpack", "b.msgpack"]
    want = flat(load_variables(src / "a.pth"))
    got = flat(load_variables(tmp_path / "out" / "a.msgpack"))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_convert_folder_without_weights_is_one_sentence(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(UserError, match="holds no weights file"):
        list(weights.convert_folder(tmp_path, tmp_path / "out", ".msgpack"))
    (tmp_path / "a.pth").write_bytes(b"x")
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(UserError, match="is a file; give a folder"):
        list(weights.convert_folder(tmp_path, tmp_path / "taken", ".msgpack"))


@pytest.mark.slow
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
