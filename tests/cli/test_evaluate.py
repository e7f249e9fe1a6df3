"""evaluate.py end to end: one-line errors, exit codes, the line, --json, --output, the PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from resnet_jax.cli import EXIT_SKIPPED
from tests.helpers import load_script, make_folder, write_image

ROOT = Path(__file__).resolve().parents[2]


evaluate_script = load_script("evaluate.py")
pytestmark = pytest.mark.usefixtures("private_compilation_cache")  # evaluate.py turns it on


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """ROOT/val/{daisy,roses}/ with two images each and, among roses, one broken file."""
    root = tmp_path_factory.mktemp("flowers")
    for c, name in enumerate(["daisy", "roses"]):
        (root / "val" / name).mkdir(parents=True)
        for i in range(2):
            write_image(root / "val" / name / f"{i}.png", (40 + 4 * i, 36), seed=2 * c + i)
    (root / "val" / "roses" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def _run_main(capsys, *argv) -> tuple[int, str, str]:
    status = evaluate_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _one_error_line(capsys, argv: list, *fragments: str) -> None:
    status, out, err = _run_main(capsys, *argv)
    lines = err.strip().splitlines()
    assert status == 1 and out == "", err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_user_errors_are_one_line(predict_setup, data, tmp_path, capsys):
    weights = ["--weights", predict_setup["weights"]]
    folder = ["--data-dir", data]
    _one_error_line(capsys, [*weights, "--data-dir", tmp_path / "nope"], "nope", "does not exist")
    _one_error_line(capsys, ["--weights", tmp_path / "nope.pth", *folder], "nope.pth")
    _one_error_line(capsys, weights, "--data-dir ROOT", "--dataset NAME")
    _one_error_line(capsys, [*weights, *folder, "--split", "test"], "no test/ folder")

    (tmp_path / "empty" / "daisy").mkdir(parents=True)
    _one_error_line(capsys, [*weights, "--data-dir", tmp_path / "empty"], "daisy has no images")
    make_folder(tmp_path / "cats", {"daisy": 1, "cats": 1, "dogs": 1})
    _one_error_line(
        capsys, [*weights, "--data-dir", tmp_path / "cats"],
        "has 2 classes the model does not know (cats, dogs)", "daisy, dandelion, roses",
    )  # fmt: skip

    # Weights that do not fit: another architecture, a class file of another size.
    _one_error_line(capsys, [*weights, *folder, "--arch", "resnet34"], "resnet34")
    three = tmp_path / "three.json"
    three.write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    _one_error_line(capsys, [*weights, *folder, "--class-indices", three], "3 classes")

    # Flag values, all refused before any image is read.
    _one_error_line(capsys, [*weights, *folder, "--batch-size", "0"], "--batch-size 0")
    _one_error_line(capsys, [*weights, *folder, "--crop", "-4"], "--crop -4")
    _one_error_line(capsys, [*weights, *folder, "--output", tmp_path / "r.xml"], "r.xml")
    _one_error_line(capsys, [*weights, *folder, "--confusion-png", tmp_path / "m.pdf"], "m.pdf")
    assert not list(tmp_path.glob("r.*")) and not list(tmp_path.glob("m.*"))


def test_a_choice_outside_the_list_is_argparse_usage(predict_setup, data, capsys):
    with pytest.raises(SystemExit) as info:
        evaluate_script.main(["--weights", str(predict_setup["weights"]), "--tta", "rotate"])
    assert info.value.code == 2 and "invalid choice: 'rotate'" in capsys.readouterr().err


def test_line_json_outputs_and_skipped_images(predict_setup, data, tmp_path, capsys):
    common = ["--weights", predict_setup["weights"], "--data-dir", data, "--crop", "32",
              "--batch-size", "2", "--workers", "1"]  # fmt: skip
    status, out, err = _run_main(capsys, *common, "--json", "--output", tmp_path / "r.csv",
                                 "--confusion-png", tmp_path / "m.png")  # fmt: skip
    assert status == EXIT_SKIPPED
    assert err.count("skipped: ") == 1 and "broken.jpg is not a readable image" in err
    assert "1 of 5 images could not be read and were skipped." in err
    (line,) = out.splitlines()
    document = json.loads(line)
    assert document["images"] == 4 and document["skipped"] == 1 and document["arch"] == "resnet18"
    assert document["data"] == str(data / "val") and document["model_classes"] == 5
    assert document["transform"]["crop_size"] == 32 and document["transform"]["resize_size"] == 37
    rows = document["classes"]
    assert [(r["class"], r["index"], r["images"]) for r in rows] == [
        ("daisy", 0, 2),
        ("roses", 2, 2),
    ]
    correct = sum(r["correct"] for r in rows)
    assert document["top1"] == correct / 4 and document["top5"] == 1.0
    with open(tmp_path / "r.csv") as f:
        assert [(r["class"], r["correct"]) for r in csv.DictReader(f)] == [
            (r["class"], str(r["correct"])) for r in rows
        ]
    assert Image.open(tmp_path / "m.png").format == "PNG"

    status, out, _ = _run_main(capsys, *common, "--output", tmp_path / "r.json")
    assert status == EXIT_SKIPPED
    assert out == (
        f"resnet18 on {data / 'val'}: top1 {document['top1']:.3%} top5 100.000% "
        f"loss {document['loss']:.4f} (4 images, 2 classes of the model's 5, 1 unreadable "
        "skipped)\n"
    )
    assert json.loads((tmp_path / "r.json").read_text()) == document
