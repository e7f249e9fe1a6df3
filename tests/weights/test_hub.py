"""`hf:ORG/NAME` weights, fetched from a local stand-in for the Hugging Face hub."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
from flax.traverse_util import flatten_dict
from PIL import Image

from resnet_jax.models.factory import create_model
from resnet_jax.runtime.errors import UserError
from resnet_jax.training.transfer import initial_variables
from resnet_jax.weights import hub
from resnet_jax.weights.conversion import convert_file
from resnet_jax.weights.io import load_variables, read_metadata
from resnet_jax.weights.torch_names import torch_to_flax
from tests.helpers import numpy_state_dict, randomised_torch_model

ROOT = Path(__file__).resolve().parents[2]
REPO = "timm/resnet18.tv2_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# timm's pretrained_cfg of torchvision's newer recipe: trained at 176, evaluated 232 -> 224.
TV2_CONFIG = {
    "architecture": "resnet18",
    "num_classes": 1000,
    "pretrained_cfg": {
        "tag": "tv2_in1k",
        "input_size": [3, 176, 176],
        "test_input_size": [3, 224, 224],
        "crop_pct": 0.875,
        "test_crop_pct": 0.965,
        "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "num_classes": 1000,
    },
}
TV2_JSON = json.dumps(TV2_CONFIG)


class FakeHub(http.server.ThreadingHTTPServer):
    """Answers `HEAD/GET /{org}/{name}/resolve/{revision}/{filename}` as the hub does: the
    X-Repo-Commit and ETag headers huggingface_hub needs, X-Error-Code on errors."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes | str]] = {}  # repo -> filename -> content
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        parts = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).strip("/").split("/")
        if len(parts) != 5 or parts[2] != "resolve":
            return self._send(404, {}, b"not found")
        repo, revision, filename = "/".join(parts[:2]), parts[3], parts[4]
        if repo not in self.server.files:  # the hub answers 401 to anonymous look-ups of these
            return self._send(401, {"X-Error-Code": "RepoNotFound"}, b"Repository not found")
        if revision not in ("main", COMMIT):
            return self._send(404, {"X-Error-Code": "RevisionNotFound"}, b"Invalid rev id")
        data = self.server.files[repo].get(filename)
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
            return self._send(404, headers, b"Entry not found")
        data = data.encode() if isinstance(data, str) else data
        etag = hashlib.sha256(data).hexdigest()
        self._send(200, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}, data, body)

    def _send(self, status: int, headers: dict, data: bytes, body: bool = True) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body and self.command == "GET":
            self.wfile.write(data)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A FakeHub on 127.0.0.1 as HF_ENDPOINT, with an empty cache under tmp_path."""
    server = FakeHub()
    monkeypatch.setattr(hub, "_PROBED", {})  # each test's hub is asked afresh
    monkeypatch.setattr(hub, "_WARNED", set())
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """model.safetensors (a randomised torchvision resnet18, as timm writes it) and its state."""
    model = randomised_torch_model("resnet18")
    path = tmp_path_factory.mktemp("hub") / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path), metadata={"format": "pt"})
    return path.read_bytes(), numpy_state_dict(model)


def assert_same(got: dict, want: dict) -> None:
    got, want = flatten_dict(got, sep="/"), flatten_dict(want, sep="/")
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.asarray(got[key]).tobytes() == np.asarray(want[key]).tobytes(), key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_weights_and_config_transform_then_offline_from_the_cache(
    fake_hub, resnet18_files, monkeypatch, capfd
):
    data, state = resnet18_files
    fake_hub.files[REPO] = {"model.safetensors": data, "config.json": TV2_JSON}
    spec = f"hf:{REPO}"
    assert_same(load_variables(spec), torch_to_flax(state))
    metadata = read_metadata(spec)
    assert (metadata.arch, metadata.num_classes, metadata.head) == ("resnet18", 1000, "replace")
    assert (metadata.image_size, metadata.resize_size, metadata.crop_size) == (176, 232, 224)
    assert metadata.mean == (0.485, 0.456, 0.406) and metadata.classes is None
    assert any(
        r.startswith(f"GET /{REPO}/resolve/main/model.safetensors") for r in fake_hub.requests
    )
    assert capfd.readouterr().err == ""  # no bar for a small file when stderr is not a terminal

    fake_hub.files.clear()  # the hub now knows nothing: only the cache can answer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(fake_hub.requests)
    assert_same(load_variables(spec), torch_to_flax(state))
    assert read_metadata(spec) == metadata
    assert len(fake_hub.requests) == asked  # offline means no request at all

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody answers there
    asked_cache_only = []
    download = huggingface_hub.hf_hub_download

    def hf_hub_download(*args, **kwargs):
        asked_cache_only.append(kwargs["local_files_only"])
        return download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert_same(load_variables(spec), torch_to_flax(state))
    assert read_metadata(spec) == metadata
    assert asked_cache_only and all(asked_cache_only)  # no retries of an unreachable hub


def test_revision_and_no_config_give_the_registry_transform(fake_hub, resnet18_files):
    fake_hub.files["timm/resnet18.tv_in1k"] = {"model.safetensors": resnet18_files[0]}
    metadata = read_metadata(f"hf:timm/resnet18.tv_in1k@{COMMIT}")
    assert (metadata.arch, metadata.resize_size, metadata.crop_size) == ("resnet18", 256, 224)
    assert f"HEAD /timm/resnet18.tv_in1k/resolve/{COMMIT}/config.json" in fake_hub.requests


def test_offline_without_a_cached_config_warns_and_uses_the_registry(
    fake_hub, resnet18_files, monkeypatch, tmp_path, capsys
):
    fake_hub.files[REPO] = {"model.safetensors": resnet18_files[0], "config.json": TV2_JSON}
    load_variables(f"hf:{REPO}")
    (config,) = (tmp_path / "hf_home").rglob("config.json")
    config.unlink()  # as when another program cached only the weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert read_metadata(f"hf:{REPO}").resize_size == 256
    read_metadata(f"hf:{REPO}")
    warning = (
        "warning: config.json of hf:timm/resnet18.tv2_in1k is not in the Hugging Face cache and "
        "the hub cannot be asked; the architecture's ImageNet eval transform is used."
    )
    assert capsys.readouterr().err.splitlines() == [warning]  # once


def test_convert_carries_the_config_transform_and_checks_arch(fake_hub, resnet18_files, tmp_path):
    fake_hub.files["timm/odd"] = {"model.safetensors": resnet18_files[0], "config.json": "{}"}
    with pytest.raises(UserError, match="config.json of hf:timm/odd is not timm's"):
        convert_file("hf:timm/odd", tmp_path / "r18.msgpack")
    assert not (tmp_path / "r18.msgpack").exists()
    fake_hub.files[REPO] = {"model.safetensors": resnet18_files[0], "config.json": TV2_JSON}
    with pytest.raises(UserError, match="do not fit resnet34"):
        convert_file(f"hf:{REPO}", tmp_path / "r18.msgpack", arch="resnet34")
    assert convert_file(f"hf:{REPO}", tmp_path / "r18.msgpack")[0] == "resnet18"
    assert read_metadata(tmp_path / "r18.msgpack").resize_size == 232


def test_train_starts_from_hub_weights_with_a_new_head(fake_hub, resnet18_files):
    fake_hub.files[REPO] = {"model.safetensors": resnet18_files[0], "config.json": TV2_JSON}
    model = create_model("resnet18", num_classes=5)
    variables, message = initial_variables(model, "resnet18", f"hf:{REPO}", seed=0)
    assert (
        message == "Loaded resnet18.tv2_in1k; its 1000-class head replaced by a new 5-class head."
    )
    want = torch_to_flax(resnet18_files[1])["params"]["layer4_1"]["conv2"]["kernel"]
    assert np.array_equal(variables["params"]["layer4_1"]["conv2"]["kernel"], want)
    assert variables["params"]["fc"]["bias"].shape == (5,)


@pytest.mark.parametrize(
    "case, message",
    [
        ("offline", "HF_HUB_OFFLINE is set and model.safetensors of hf:timm/resnet18.tv2_in1k"),
        ("unreachable", "Cannot reach the Hugging Face hub at http://127.0.0.1:"),
        ("unknown repo", "There is no repository timm/resnet18.tv2_in1k on the Hugging Face hub"),
        ("no weights file", "hf:timm/resnet18.tv2_in1k has no model.safetensors"),
        ("unknown revision", "timm/resnet18.tv2_in1k has no revision 'v9'"),
        ("not a repo name", "'hf:timm' is not a Hugging Face repository"),
        ("not torchvision's", "Checkpoint key 'stem.weight' is not part of a torchvision ResNet"),
    ],
)  # fmt: skip
def test_failures_are_one_sentence(fake_hub, monkeypatch, case, message):
    spec = f"hf:{REPO}"
    fake_hub.files[REPO] = {"config.json": b"{}"}
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif case == "unreachable":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    elif case == "unknown repo":
        fake_hub.files.clear()
    elif case == "unknown revision":
        spec += "@v9"
    elif case == "not a repo name":
        spec = "hf:timm"
    elif case == "not torchvision's":
        tensors = {"stem.weight": np.zeros((2, 2), np.float32)}
        fake_hub.files[REPO]["model.safetensors"] = safetensors.numpy.save(tensors)
    with pytest.raises(UserError) as error:
        load_variables(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], check=False, capture_output=True,
        text=True, cwd=cwd, timeout=300, env=dict(os.environ),
    )  # fmt: skip


@pytest.mark.slow
def test_predict_cli_from_the_hub_then_offline_error(
    fake_hub, resnet18_files, tmp_path, monkeypatch
):
    fake_hub.files[REPO] = {"model.safetensors": resnet18_files[0], "config.json": TV2_JSON}
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(tmp_path / "grey.jpg")
    done = run_script("predict.py", "grey.jpg", "--weights", f"hf:{REPO}", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["image"].endswith("grey.jpg")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    done = run_script("predict.py", "grey.jpg", "--weights", f"hf:{REPO}", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    expected = (
        "error: HF_HUB_OFFLINE is set and model.safetensors of hf:timm/resnet18.tv2_in1k is not "
        "in the Hugging Face cache; unset HF_HUB_OFFLINE to download it, or download "
        "model.safetensors from the repository and pass --weights PATH."
    )
    assert done.stderr.strip().splitlines() == [expected]


@pytest.mark.slow
def test_convert_cli_from_the_hub_and_a_404(fake_hub, resnet18_files, tmp_path):
    fake_hub.files[REPO] = {"model.safetensors": resnet18_files[0], "config.json": TV2_JSON}
    done = run_script("convert_weights.py", f"hf:{REPO}", "r18.safetensors", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resnet18, 11,689,512 parameters" in done.stdout
    assert read_metadata(tmp_path / "r18.safetensors").resize_size == 232

    done = run_script("convert_weights.py", "hf:timm/nothing-here", "x.msgpack", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("error: There is no repository timm/nothing-here")
