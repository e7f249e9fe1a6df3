"""predict.py end to end: exit codes, one-line errors, --cam, --output, the progress bar."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_jax.cli import EXIT_SKIPPED
from resnet_jax.inference import output as predict_output
from resnet_jax.inference import predictor as inference
from resnet_jax.inference.predictor import Prediction, Predictor
from resnet_jax.weights.io import save_variables
from resnet_jax.weights.torch_names import torch_to_flax
from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]


CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


predict_script = load_script("predict.py")
# predict_cli turns on JAX's persistent cache: keep it out of ~/.cache and this module.
pytestmark = pytest.mark.usefixtures("private_compilation_cache")


@pytest.fixture(scope="module")
def predictor(predict_setup):
    return Predictor.load(predict_setup["weights"])


def _run_main(capsys, *argv: str) -> tuple[int, str, str]:
    status = predict_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_bad_input_one_line_exit_1(predict_setup, tmp_path, capsys):
    weights, image = predict_setup["weights"], predict_setup["images"][0]
    status, out, err = _run_main(capsys, tmp_path / "missing.png", "--weights", weights)
    assert status == 1 and out == ""
    _one_error_line(err, "missing.png", "does not exist")

    (tmp_path / "empty").mkdir()
    status, _, err = _run_main(capsys, tmp_path / "empty", "--weights", weights)
    assert status == 1
    _one_error_line(err, "empty", "no images")

    status, _, err = _run_main(capsys, predict_setup["folder"] / "broken.jpg", "--weights", weights)
    assert status == 1
    _one_error_line(err, "broken.jpg", "not a readable image")

    broken = predict_setup["folder"] / "broken.jpg"
    status, out, err = _run_main(capsys, broken, broken, "--weights", weights)
    assert status == 1 and out == ""
    assert err.count("skipped: ") == 2 and "error: None of the 2 images" in err

    status, _, err = _run_main(capsys, image, "--weights", tmp_path / "nope.pth")
    assert status == 1
    _one_error_line(err, "nope.pth")

    wrong = tmp_path / "three.json"
    wrong.write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    status, _, err = _run_main(capsys, image, "--weights", weights, "--class-indices", wrong)
    assert status == 1
    _one_error_line(err, "three.json", "3 classes", "5 outputs")

    status, _, err = _run_main(capsys, image, "--weights", weights, "--arch", "resnet34")
    assert status == 1
    _one_error_line(err, "resnet34")

    status, _, err = _run_main(capsys, image, "--weights", weights, "--output", tmp_path / "o.xml")
    assert status == 1
    _one_error_line(err, "o.xml")


def test_unknown_architecture(predict_setup, tmp_path, capsys):
    # One block per stage: shaped like a ResNet, but no torchvision model has these depths.
    state = {
        k: v
        for k, v in predict_setup["model"].state_dict().items()
        if not (k.startswith("layer") and k.split(".")[1] == "1")
    }
    weights = tmp_path / "odd.pth"
    torch.save(state, weights)
    status, _, err = _run_main(capsys, predict_setup["images"][0], "--weights", weights)
    assert status == 1
    _one_error_line(err, "not a known ResNet")


def test_folder_with_corrupt_file_exit_2(predict_setup, tmp_path, capsys):
    out_json = tmp_path / "results.json"
    status, out, err = _run_main(
        capsys, predict_setup["folder"], "--weights", predict_setup["weights"], "--batch-size", "2",
        "--output", out_json,
    )  # fmt: skip
    assert status == EXIT_SKIPPED
    assert "broken.jpg" in err and "1 of 4 images" in err
    headers = [line for line in out.splitlines() if line.endswith(":")]
    assert headers == [f"{p}:" for p in predict_setup["images"]]
    assert len(out.splitlines()) == 3 * (1 + len(CLASSES))
    records = json.loads(out_json.read_text())
    assert [r["image"] for r in records] == [str(p) for p in predict_setup["images"]]


def test_save_plot_and_missing_matplotlib(predict_setup, tmp_path, capsys, monkeypatch):
    predictions = [Prediction(str(predict_setup["images"][0]), np.eye(5, dtype=np.float32)[3])]
    target = tmp_path / "plot.png"
    predict_output.plot(predictions, CLASSES, target, show=False)
    assert Image.open(target).format == "PNG"

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    status, _, err = _run_main(
        capsys,
        predict_setup["images"][0],
        "--weights",
        predict_setup["weights"],
        "--save-plot",
        target,
    )
    assert status == 1
    _one_error_line(err, "matplotlib", "pip install")


def test_cli_end_to_end_json(predict_setup, tmp_path):
    """One real process: JSON on stdout, CSV written, exit 2 for the skipped file, no traceback."""
    out_csv = tmp_path / "results.csv"
    result = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), str(predict_setup["folder"]), str(predict_setup["images"][1]),
         "--weights", str(predict_setup["weights"]), "--json", "--top-k", "2", "--output", str(out_csv)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == EXIT_SKIPPED, result.stderr
    assert "Traceback" not in result.stderr and "broken.jpg" in result.stderr
    records = json.loads(result.stdout)
    want = [str(p) for p in predict_setup["images"]] + [str(predict_setup["images"][1])]
    assert [r["image"] for r in records] == want
    assert records[1] == records[3] | {"image": records[1]["image"]}
    for r in records:
        preds = r["predictions"]
        assert len(preds) == 2 and preds[0]["prob"] >= preds[1]["prob"]
        assert set(preds[0]) == {"index", "class", "prob"}
        assert preds[0]["class"] == CLASSES[preds[0]["index"]]
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 2 * len(records)
    assert rows[0]["class"] == records[0]["predictions"][0]["class"]


def test_wrong_but_plausible_inputs_are_refused_before_any_work(predict_setup, tmp_path, capsys):
    weights, image = predict_setup["weights"], predict_setup["images"][0]
    status, out, err = _run_main(capsys, image, "--weights", weights, "--save-plot", "x.xyz")
    assert status == 1 and out == ""  # checked before predicting and printing
    _one_error_line(err, "--save-plot x.xyz", "cannot write .xyz")

    status, out, err = _run_main(capsys, image, "--weights", weights, "--class-indices", tmp_path)
    assert status == 1 and out == ""
    _one_error_line(err, "Cannot read class index file", str(tmp_path))

    state = {k: v.detach().numpy().copy() for k, v in predict_setup["model"].state_dict().items()}
    variables = torch_to_flax(state)
    variables["params"]["fc"]["bias"][0] = np.nan
    diverged = tmp_path / "diverged.msgpack"
    save_variables(diverged, variables)
    status, out, err = _run_main(capsys, image, "--weights", diverged, "--json")
    assert status == 1 and out == ""
    _one_error_line(err, "diverged.msgpack", "not finite")


def test_cam_writes_one_titled_png_per_image_and_leaves_stdout_as_it_was(
    predict_setup, tmp_path, capsys
):
    folder, weights = predict_setup["folder"], predict_setup["weights"]
    plain = _run_main(capsys, folder, "--weights", weights, "--batch-size", "2")
    cams = tmp_path / "cams"
    status, out, err = _run_main(
        capsys, folder, "--weights", weights, "--batch-size", "2", "--cam-dir", cams
    )
    assert (status, out) == plain[:2]  # the same predictions, the same lines
    assert f"Grad-CAM: 3 images written to {cams}" in err
    written = sorted(p.name for p in cams.iterdir())
    assert written == ["img0.cam.png", "img1.cam.png", "img2.cam.png"]
    for path in cams.iterdir():
        assert Image.open(path).format == "PNG"


def test_cam_dir_that_cannot_be_made_is_refused_before_any_work(predict_setup, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    status, out, err = _run_main(
        capsys,
        predict_setup["images"][0],
        "--weights",
        predict_setup["weights"],
        "--cam-dir",
        blocker / "cams",
    )
    assert status == 1 and out == ""
    _one_error_line(err, str(blocker / "cams"))


def test_progress_bar_on_stderr_only(predict_setup, predictor, capsys, monkeypatch):
    predictor.predict_files(predict_setup["images"], batch_size=2, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "3/3" in err
    predictor.predict_files(predict_setup["images"], batch_size=2)  # few images: no bar
    assert capsys.readouterr() == ("", "")

    monkeypatch.setattr(inference, "PROGRESS_THRESHOLD", 3)
    status, out, err = _run_main(
        capsys, *predict_setup["images"], "--weights", predict_setup["weights"]
    )
    assert status == 0 and "3/3" in err and "3/3" not in out
    assert all(
        line.startswith(("class: ", str(predict_setup["folder"]))) for line in out.splitlines()
    )


@pytest.mark.slow
def test_cli_cam_writes_into_gradcam_by_default(predict_setup, tmp_path):
    image = predict_setup["images"][1]
    result = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), str(image), "--weights", str(predict_setup["weights"]),
         "--cam"],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(CLASSES)
    assert Image.open(tmp_path / "gradcam" / "img1.cam.png").format == "PNG"
