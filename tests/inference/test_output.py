"""resnet_jax.inference.output: the printed lines, JSON records, CSV/JSON files, Grad-CAM names."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from resnet_jax.inference import output as predict_output
from resnet_jax.inference.predictor import Prediction
from resnet_jax.runtime.errors import UserError

CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def _prediction(name: str, probs: list[float]) -> Prediction:
    return Prediction(name, np.asarray(probs, np.float32))


def test_printed_format_original_lines_in_index_order():
    p = _prediction("a.jpg", [0.01, 0.005, 0.004, 0.981, 0.0])
    text = predict_output.format_text([p], CLASSES)
    assert text.splitlines() == [
        "class: daisy      prob: 0.01",
        "class: dandelion  prob: 0.005",
        "class: roses      prob: 0.004",
        "class: sunflowers prob: 0.981",
        "class: tulips     prob: 0.0",
    ]
    # Several images: a header line naming each; --top-k: highest first.
    q = _prediction("b.jpg", [0.1, 0.6, 0.1, 0.1, 0.1])
    lines = predict_output.format_text([p, q], CLASSES, top_k=1).splitlines()
    assert lines == [
        "a.jpg:",
        "class: sunflowers prob: 0.981",
        "b.jpg:",
        "class: dandelion  prob: 0.6",
    ]


def test_printed_format_top5_for_many_classes():
    probs = np.linspace(0.0, 1.0, 12)
    probs /= probs.sum()
    classes = [f"c{i}" for i in range(12)]
    lines = predict_output.format_text(
        [Prediction("x", probs.astype(np.float32))], classes
    ).splitlines()
    assert [line.split()[1] for line in lines] == ["c11", "c10", "c9", "c8", "c7"]


def test_json_records_schema():
    p = _prediction("a.jpg", [0.1, 0.2, 0.05, 0.6, 0.05])
    records = predict_output.to_records([p], CLASSES)
    assert list(records[0]) == ["image", "predictions"]
    preds = records[0]["predictions"]
    assert [d["index"] for d in preds] == [3, 1, 0, 2, 4]  # ties stay in index order
    assert preds[0] == {"index": 3, "class": "sunflowers", "prob": float(np.float32(0.6))}
    assert all(isinstance(d["prob"], float) for d in preds)
    assert len(predict_output.to_records([p], CLASSES, top_k=2)[0]["predictions"]) == 2


def test_write_output_csv_and_json(tmp_path):
    records = predict_output.to_records(
        [
            _prediction("a.jpg", [0.1, 0.2, 0.05, 0.6, 0.05]),
            _prediction("b,c.jpg", [1, 0, 0, 0, 0]),
        ],
        CLASSES,
        top_k=2,
    )
    predict_output.write_output(tmp_path / "out.json", records)
    assert json.loads((tmp_path / "out.json").read_text()) == records
    predict_output.write_output(tmp_path / "out.csv", records)
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert [(r["image"], r["rank"], r["class"]) for r in rows] == [
        ("a.jpg", "1", "sunflowers"),
        ("a.jpg", "2", "dandelion"),
        ("b,c.jpg", "1", "daisy"),
        ("b,c.jpg", "2", "dandelion"),
    ]
    assert float(rows[0]["prob"]) == records[0]["predictions"][0]["prob"]
    with pytest.raises(UserError, match=r"\.csv or \.json"):
        predict_output.write_output(tmp_path / "out.txt", records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "out.json"]  # no temp files


def test_cam_file_names_are_unique():
    predictions = [Prediction(p, np.ones(2)) for p in ["a/x.jpg", "b/x.png", "c/y.jpg", "x.jpg"]]
    assert predict_output._cam_names(predictions) == [
        "x.cam.png", "x-2.cam.png", "y.cam.png", "x-3.cam.png"
    ]  # fmt: skip
