"""train.py end to end in subprocesses: outputs, kill -9 and resume, freezing, 2 devices, 2
processes, failures that must end in one line. Every run shares one persistent compilation
cache, so only the first compiles. tests/training/test_trainer.py tests the trainer in process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from resnet_jax.data.sources import read_class_indices
from resnet_jax.models.factory import create_model
from resnet_jax.training.checkpoint import Checkpoints
from resnet_jax.training.transfer import initial_variables
from resnet_jax.weights.io import load_variables, read_metadata
from tests.helpers import flat, make_train_val_folder, tensorboard_series

pytestmark = pytest.mark.slow  # every test runs train.py in subprocesses

REPO = Path(__file__).resolve().parents[2]

# Small enough for seconds per epoch on a shared 2-core CPU (3 steps of 6 images at 48 px), and
# smooth enough (SGD, small lr, BatchNorm over 6 images of 2x2 or more pixels) that runs on one
# and two devices agree to float tolerance. The same flags everywhere share one compilation.
TINY = {"arch": "resnet18", "weights": "none", "image_size": 48, "batch_size": 6, "workers": 1,
        "optimizer": "sgd", "lr": 1e-3, "log_every": 2}  # fmt: skip
TINY_ARGS = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def train_env(cache_dir: Path, devices: int = 1) -> dict[str, str]:
    """The environment for a `train.py` subprocess: a private compilation cache, N CPU devices."""
    env = dict(os.environ, RESNET_JAX_CACHE=str(cache_dir), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_train(
    args: list[str], env: dict[str, str], timeout: float = 300, script: str | None = None
) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in the repository root (or `python -c SCRIPT ARGS`, a script that
    patches something and then runs train.py's main); output captured as text."""
    program = ["train.py"] if script is None else ["-c", script]
    return subprocess.run(
        [sys.executable, *program, *args],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOSSES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val_folder(tmp_path_factory.mktemp("flowers"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return train_env(tmp_path_factory.getbasetemp() / "jax_cache")


@pytest.fixture(scope="module")
def reference(data, env, tmp_path_factory):
    """An uninterrupted 2-epoch run on one device: (output dir, stdout)."""
    out = tmp_path_factory.mktemp("reference")
    result = run_train(
        [*TINY_ARGS, "--data-dir", str(data), "--epochs", "2", "--output-dir", str(out)], env
    )
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def losses(output_dir) -> list[tuple]:
    return [tuple(m[k] for k in LOSSES) for m in read_metrics(output_dir)]


def assert_same_epoch(got: tuple, expected: tuple) -> None:
    """Train loss and accuracy to 1e-4; the validation loss, computed from running statistics
    after 3 steps of a tiny random network, to 1e-2: float32 reduction order alone moves it by
    ~0.3% there (and can flip a validation answer), while BatchNorm statistics that were not
    global across devices would move the train loss itself."""
    np.testing.assert_allclose(got[:2], expected[:2], rtol=1e-4)
    np.testing.assert_allclose(got[2], expected[2], rtol=1e-2)


def flat_variables(path) -> dict:
    return flat(load_variables(path))


def test_run_writes_every_output(reference):
    out, stdout = reference
    lines = [line for line in stdout.splitlines() if line.startswith("[epoch")]
    assert len(lines) == 2
    assert lines[0].startswith("[epoch 1] train_loss: ") and " val_accuracy: " in lines[0]
    assert "images/s)" in lines[1]
    metrics = read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {
            "train_loss",
            "val_loss",
            "val_accuracy",
            "images_per_second",
            "seconds",
        } <= m.keys()
        assert 0 <= m["val_accuracy"] <= 1 and m["images_per_second"] > 0
    assert read_class_indices(out / "class_indices.json") == ["class0", "class1", "class2"]
    variables = load_variables(out / "best.msgpack")
    assert variables["params"]["fc"]["kernel"].shape == (512, 3)
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(out / "checkpoints")) in (["1", "2"], ["2"])


def test_predict_repeats_the_best_validation_exactly(reference, data, env):
    """best.msgpack carries the 48 px eval transform and the classes: predict.py on the
    validation folder scores the best val_accuracy exactly, without being told either."""
    out = reference[0]
    result = subprocess.run(
        [sys.executable, "predict.py", str(data / "val"), "--weights", str(out / "best.msgpack"),
         "--json", "--top-k", "1"],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert len(records) == 6
    correct = [Path(r["image"]).parent.name == r["predictions"][0]["class"] for r in records]
    best = max(m["val_accuracy"] for m in read_metrics(out))
    assert sum(correct) / len(correct) == best
    metadata = read_metadata(out / "best.msgpack")
    assert (metadata.image_size, metadata.resize_size, metadata.crop_size) == (48, 55, 48)
    assert metadata.classes == ("class0", "class1", "class2")


STOP = """
import sys, threading
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler
from resnet_jax.training.checkpoint import Checkpoints
from resnet_jax.training.parallel import DataParallel
import train

def wait_for_the_kill():
    print("stopped", flush=True)
    threading.Event().wait()

if sys.argv.pop(1) == "write":  # the first checkpoint write, its folder still a temporary one
    save_json = JsonCheckpointHandler._save_fn

    async def save_json_and_stop(self, x, directory):
        await save_json(self, x, directory)
        wait_for_the_kill()

    JsonCheckpointHandler._save_fn = save_json_and_stop
else:  # the second step of epoch 2, the checkpoint and metrics of epoch 1 complete on disk
    save, compile_step = Checkpoints.save, DataParallel.jit_train_step

    def save_and_wait(self, *args):
        save(self, *args)
        self.wait()

    def jit_stopping_step(self, options=None):
        step = compile_step(self, options)

        def stopping(state, batch, totals):
            if int(state.step) == 4:
                wait_for_the_kill()
            return step(state, batch, totals)

        return stopping

    Checkpoints.save, DataParallel.jit_train_step = save_and_wait, jit_stopping_step
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("moment", ["write", "epoch 2"])
def test_kill_9_then_resume(reference, data, env, tmp_path, moment):
    """Killed during the first checkpoint write or in epoch 2 (the run says when it got there,
    on stdout), a resumed run ends as the uninterrupted one."""
    args = [*TINY_ARGS, "--data-dir", str(data), "--epochs", "2", "--output-dir", str(tmp_path)]
    with open(tmp_path / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", STOP, moment, *args], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    guard = threading.Timer(240, proc.kill)  # a run that never gets there fails, not hangs
    guard.start()
    stopped = any(line == "stopped\n" for line in proc.stdout)  # or the end of the output
    guard.cancel()
    stderr_tail = (tmp_path / "stderr.log").read_text()[-4000:]
    assert stopped and proc.poll() is None, f"the run ended before the kill: {stderr_tail}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    ckpts = tmp_path / "checkpoints"
    if moment == "write":
        assert [n for n in os.listdir(ckpts) if "tmp" in n]

    resumed = run_train([*args, "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    if moment == "epoch 2":
        assert "Resuming" in resumed.stdout and "[epoch 1]" not in resumed.stdout
    # Same data order, same state, same programs: the metrics of an uninterrupted run.
    assert losses(tmp_path) == losses(reference[0])
    assert not [n for n in os.listdir(ckpts) if "tmp" in n]
    load_variables(tmp_path / "best.msgpack")
    # TensorBoard shows every point once, as the uninterrupted run wrote it.
    got, want = (tensorboard_series(d / "tensorboard") for d in (tmp_path, reference[0]))
    for tag in ("step/train_loss", "epoch/val_confusion_matrix", *(f"epoch/{k}" for k in LOSSES)):
        assert got[tag] == want[tag], tag
    assert (tmp_path / "confusion_matrix.png").read_bytes() == (
        reference[0] / "confusion_matrix.png"
    ).read_bytes()


def test_torchvision_pth_with_frozen_backbone(data, env, tmp_path):
    """--weights file.pth (converted on the fly), new 3-class head, backbone bit-identical."""
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-random.pth")
    start = flat_variables(tmp_path / "resnet18-random.pth")
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-dir", str(data), "--epochs", "1", "--output-dir", str(out)]
    pth = str(tmp_path / "resnet18-random.pth")
    result = run_train([*args, "--weights", pth, "--freeze", "backbone", "--lr", "0.1"], env)
    assert result.returncode == 0, result.stderr
    assert "its 1000-class head replaced by a new 3-class head" in result.stdout
    after = flat_variables(out / "best.msgpack")
    assert after["params/fc/kernel"].shape == (512, 3)
    assert after.keys() == start.keys()
    for key, value in start.items():
        if not key.startswith("params/fc/"):
            np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_head_append_with_frozen_backbone_trains_only_the_new_layer(data, env, tmp_path):
    """--head append --freeze backbone: the pretrained network, fc included, stays
    bit-identical; only the appended head trains, and predict.py knows the layout."""
    import torch
    import torchvision

    torch.manual_seed(0)
    pth = tmp_path / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18().state_dict(), pth)
    start = flat_variables(pth)
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--data-dir", str(data), "--epochs", "1", "--output-dir", str(out),
            "--weights", str(pth), "--head", "append", "--freeze", "backbone", "--lr", "0.1"]  # fmt: skip
    result = run_train(args, env)
    assert result.returncode == 0, result.stderr
    assert "its 1000-class fc kept, a new 3-class head appended" in result.stdout
    after = flat_variables(out / "best.msgpack")
    assert after.keys() - start.keys() == {"params/head/kernel", "params/head/bias"}
    for key, value in start.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    model = create_model("resnet18", num_classes=3, head="append")
    initial = flat(initial_variables(model, "resnet18", str(pth), seed=0)[0])
    assert not np.array_equal(after["params/head/kernel"], initial["params/head/kernel"])
    assert read_metadata(out / "best.msgpack").head == "append"
    predicted = subprocess.run(
        [sys.executable, "predict.py", str(data / "val"), "--weights", str(out / "best.msgpack")],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.count("class: class0") == 6


def test_two_devices_give_the_losses_of_one(reference, data, tmp_path_factory, tmp_path):
    env2 = train_env(tmp_path_factory.getbasetemp() / "jax_cache", devices=2)
    args = [*TINY_ARGS, "--data-dir", str(data), "--epochs", "1", "--output-dir", str(tmp_path)]
    result = run_train(args, env2)
    assert result.returncode == 0, result.stderr
    assert_same_epoch(losses(tmp_path)[0], losses(reference[0])[0])


WORKER = """
import sys, numpy as np, jax
from flax import traverse_util
from resnet_jax.training.config import TrainConfig
from resnet_jax.training.trainer import train
process_id, port, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
config = TrainConfig(**eval(sys.argv[5]), data_dir=data, epochs=1, output_dir=out,
                     coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                     process_id=process_id)
result = train(config)
assert jax.process_count() == 2 and jax.device_count() == 2
state = result.state
variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
np.savez(f"{out}/variables_{process_id}.npz", **traverse_util.flatten_dict(variables, sep="/"))
"""


def test_two_processes_end_with_identical_parameters(reference, data, env, tmp_path):
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), port, str(data), str(tmp_path), repr(TINY)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    first, second = (np.load(tmp_path / f"variables_{i}.npz") for i in (0, 1))
    assert len(first.files) > 100
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key])
    # Process 0 alone reports, and the global batch makes it the single-process run.
    assert outputs[0].count("[epoch 1]") == 1 and "[epoch 1]" not in outputs[1]
    assert len(os.listdir(tmp_path / "tensorboard")) == 1
    assert_same_epoch(losses(tmp_path)[0], losses(reference[0])[0])


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a failed run, after checking that nothing else went wrong."""
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_resume_from_a_damaged_checkpoint_is_one_line(reference, data, env, tmp_path):
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    latest = tmp_path / "checkpoints" / "2"
    for path in (latest / "state").rglob("d/*"):  # the array data, cut in half
        os.truncate(path, path.stat().st_size // 2)
    args = [*TINY_ARGS, "--data-dir", str(data), "--epochs", "3", "--output-dir", str(tmp_path)]
    error = one_error_line(run_train([*args, "--resume"], env))
    assert f"checkpoint {latest} is damaged" in error and "--overwrite" in error


DISK_FULL = """
import errno, sys
from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler
import train

meta_writes = []

async def disk_full_on_epoch_2(self, x, directory):
    meta_writes.extend([directory] if self._filename == "metadata" else [])
    if len(meta_writes) == 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    directory.joinpath(self._filename).write_text(__import__("json").dumps(x))

JsonCheckpointHandler._save_fn = disk_full_on_epoch_2
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_full_disk_stops_training_with_one_line(reference, data, env, tmp_path):
    args = [*TINY_ARGS, "--data-dir", str(data), "--epochs", "3", "--output-dir", str(tmp_path)]
    result = run_train(args, env, script=DISK_FULL)
    error = one_error_line(result)
    assert f"Cannot write {tmp_path / 'checkpoints' / '2'}: the disk is full" in error
    assert "the last good checkpoint is epoch 1" in error
    assert "[epoch 3]" not in result.stdout
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_synthetic_reports_images_per_second(env, tmp_path):
    args = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "2", "--epochs", "1",
            "--synthetic", "3", "--output-dir", str(tmp_path), "--no-tensorboard"]  # fmt: skip
    result = run_train(args, env)
    assert result.returncode == 0, result.stderr
    assert "images/s)" in result.stdout and "initialised at random" in result.stdout
    assert read_metrics(tmp_path)[0]["images_per_second"] > 0
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tensorboard").exists()


def test_the_cifar_recipe_from_the_command_line(data, env, tmp_path):
    """--recipe cifar-paper with two flags of its own: CIFAR's pad crop at 32 px, SGD, and
    validation and best.msgpack at 32 px without a crop margin; --max-steps 4 ends the run in
    its second epoch."""
    args = ["--recipe", "cifar-paper", "--arch", "resnet18", "--data-dir", str(data),
            "--batch-size", "6", "--max-steps", "4", "--workers", "1",
            "--output-dir", str(tmp_path)]  # fmt: skip
    result = run_train(args, env)
    assert result.returncode == 0, result.stderr
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1, 2]
    metadata = read_metadata(tmp_path / "best.msgpack")
    assert (metadata.image_size, metadata.resize_size, metadata.crop_size) == (32, 32, 32)
    assert metadata.weights == "raw"
    ckpts = Checkpoints(tmp_path / "checkpoints")
    try:
        saved = ckpts.meta()["config"]
    finally:
        ckpts.close()
    assert (saved["optimizer"], saved["lr"], saved["lr_milestones"]) == ("sgd", 0.1, [32000, 48000])
    assert (saved["train_crop_mode"], saved["max_steps"]) == ("pad_crop", 4)


@pytest.mark.parametrize(
    "extra, devices, message",
    [
        (["--arch", "resnet19"], 1, "Unknown architecture 'resnet19'"),
        (["--data-dir", "/nonexistent/flowers"], 1, "/nonexistent/flowers"),
        (["--arch", "resnet34", "--weights", "WEIGHTS"], 1, "do not fit resnet34"),
        (["--batch-size", "3"], 2, "--batch-size 3 is not divisible by the 2 devices"),
        (["--accumulate-steps", "2"], 2, "does not split into --accumulate-steps 2 micro-batches"),
        (["--coordinator-address", "127.0.0.1:1"], 1, "multi-process"),
        (["--output-dir", "A_FILE"], 1, "is a file; choose a folder for the run's outputs"),
    ],
)
def test_user_errors_are_one_line(
    reference, data, tmp_path_factory, tmp_path, extra, devices, message
):
    env = train_env(tmp_path_factory.getbasetemp() / "jax_cache", devices=devices)
    (tmp_path / "a_file").write_text("")
    stand_ins = {"WEIGHTS": str(reference[0] / "best.msgpack"), "A_FILE": str(tmp_path / "a_file")}
    extra = [stand_ins.get(a, a) for a in extra]
    args = [*TINY_ARGS, "--data-dir", str(data), "--output-dir", str(tmp_path), *extra]
    result = run_train(args, env, timeout=120)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
