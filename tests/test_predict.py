"""predict.py and resnet_jax.inference: output formats, torchvision agreement, bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms as T

from resnet_jax import inference, predict_output
from resnet_jax.cli.predict import EXIT_SKIPPED
from resnet_jax.convert import torch_to_flax
from resnet_jax.errors import UserError
from resnet_jax.inference import Prediction, Predictor
from resnet_jax.weights import convert_file, save_variables

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def _load_predict_script():
    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


predict_script = _load_predict_script()


def _torch_resnet18(num_classes: int, seed: int = 0) -> torch.nn.Module:
    """torchvision resnet18 with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.fc.weight.mul_(3.0)  # spread the logits so images differ in their top-1
    return model.eval()


def _write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A smooth random image (blurred noise plus a colour ramp) of (width, height) `size`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4 + 8 * seed, 4 + 8 * seed, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    image.save(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def private_compilation_cache(tmp_path_factory):
    """predict_cli turns on JAX's persistent cache: keep it out of ~/.cache and this module."""
    names = [
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    ]
    saved = {n: getattr(jax.config, n) for n in names}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RESNET_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 5-class torchvision resnet18 saved with torch.save, its class file, and images."""
    root = tmp_path_factory.mktemp("predict")
    model = _torch_resnet18(len(CLASSES), seed=2)  # a seed whose top-1 varies by image
    weights = root / "model" / "resnet18.pth"
    weights.parent.mkdir()
    torch.save(model.state_dict(), weights)
    (weights.parent / "class_indices.json").write_text(
        json.dumps({str(i): c for i, c in enumerate(CLASSES)}, indent=4)
    )
    folder = root / "images"
    folder.mkdir()
    sizes = [(300, 260), (240, 320), (256, 256)]
    images = [_write_image(folder / f"img{i}.png", s, i) for i, s in enumerate(sizes)]
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, ignored")
    return {"root": root, "model": model, "weights": weights, "images": images, "folder": folder}


@pytest.fixture(scope="module")
def predictor(setup):
    return Predictor.load(setup["weights"])


def _torch_probs(model: torch.nn.Module, paths: list[Path]) -> np.ndarray:
    tf = T.Compose(
        [
            T.Resize(256),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).numpy()


def test_agrees_with_torchvision_and_compiles_once(setup, predictor):
    assert predictor.classes == CLASSES
    assert predictor.model.num_classes == 5
    paths = setup["images"]
    # Batch size 2 over 3 images: the last batch is padded, not dropped, not recompiled.
    predictions = predictor.predict_files(paths, batch_size=2)
    assert [p.image for p in predictions] == [str(p) for p in paths]
    ours = np.stack([p.probs for p in predictions])
    want = _torch_probs(setup["model"], paths)
    assert want.max(axis=1).min() < 0.99  # the check below is not about saturated softmaxes
    np.testing.assert_array_equal(ours.argmax(1), want.argmax(1))
    np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)
    assert predictor._forward._cache_size() == 1


def test_appended_head_is_found_from_torch_names_and_agrees_with_torch(setup, tmp_path):
    """torchvision's resnet18 followed by a Linear(1000, 5), saved with the extra layer as
    `head.weight` / `head.bias`: the head layout comes from the names, in every format."""
    model = _torch_resnet18(1000, seed=3)
    torch.manual_seed(4)
    head = torch.nn.Linear(1000, len(CLASSES))
    state = {**model.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}}
    torch.save(state, tmp_path / "appended.pth")
    convert_file(tmp_path / "appended.pth", tmp_path / "appended.safetensors")
    assert {"fc.weight", "head.weight", "head.bias"} <= set(
        load_file(tmp_path / "appended.safetensors")
    )
    loaded = torchvision.models.resnet18().load_state_dict(
        load_file(tmp_path / "appended.safetensors"), strict=False
    )
    assert sorted(loaded.unexpected_keys) == ["head.bias", "head.weight"]
    assert not loaded.missing_keys
    predictor = Predictor.load(tmp_path / "appended.safetensors")
    assert predictor.model.head == "append" and predictor.model.num_classes == len(CLASSES)
    ours = np.stack([p.probs for p in predictor.predict_files(setup["images"])])
    want = _torch_probs(torch.nn.Sequential(model, head).eval(), setup["images"])
    np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)


def test_predict_arrays_matches_files(setup, predictor):
    from resnet_jax.transforms import eval_transform_uint8, load_rgb

    path = setup["images"][0]
    probs = predictor.predict_arrays(eval_transform_uint8(load_rgb(path))[None])
    assert probs.shape == (1, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(probs[0], predictor.predict_files([path])[0].probs)


def test_bad_image_skipped_in_order(setup):
    good = setup["images"]
    broken = setup["folder"] / "broken.jpg"
    small = Predictor.load(setup["weights"], image_size=64)
    skipped = []
    paths = [good[0], broken, good[1], good[2]]
    predictions = small.predict_files(paths, batch_size=2, on_skip=skipped.append)
    assert [p.image for p in predictions] == [str(p) for p in good]
    assert [s.path for s in skipped] == [str(broken)]
    # Without on_skip, an unreadable image stops the run with a UserError naming it.
    with pytest.raises(UserError, match="broken.jpg"):
        small.predict_files(paths, batch_size=2)
    assert small._forward._cache_size() == 1


def test_find_images(setup, tmp_path):
    found = inference.find_images([setup["folder"], setup["images"][0]])
    names = [p.name for p in found]
    assert names == ["broken.jpg", "img0.png", "img1.png", "img2.png", "img0.png"]
    with pytest.raises(UserError, match="does not exist"):
        inference.find_images([tmp_path / "missing.jpg"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="contains no images"):
        inference.find_images([tmp_path / "empty"])


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


def test_imagenet_names_fallback(tmp_path):
    names = inference.load_class_names(1000, tmp_path / "w.msgpack")
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert names == inference.imagenet_classes()


def test_class_file_size_mismatch(tmp_path):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"0": "a", "1": "b"}))
    with pytest.raises(UserError, match="2 classes but the weights have 5"):
        inference.load_class_names(5, tmp_path / "w.msgpack", path)
    with pytest.raises(UserError, match="does not exist"):
        inference.load_class_names(5, tmp_path / "w.msgpack", tmp_path / "nope.json")


def _run_main(capsys, *argv: str) -> tuple[int, str, str]:
    status = predict_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _one_error_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_bad_input_one_line_exit_1(setup, tmp_path, capsys):
    weights, image = setup["weights"], setup["images"][0]
    status, out, err = _run_main(capsys, tmp_path / "missing.png", "--weights", weights)
    assert status == 1 and out == ""
    _one_error_line(err, "missing.png", "does not exist")

    (tmp_path / "empty").mkdir()
    status, _, err = _run_main(capsys, tmp_path / "empty", "--weights", weights)
    assert status == 1
    _one_error_line(err, "empty", "no images")

    status, _, err = _run_main(capsys, setup["folder"] / "broken.jpg", "--weights", weights)
    assert status == 1
    _one_error_line(err, "broken.jpg", "not a readable image")

    broken = setup["folder"] / "broken.jpg"
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


def test_unknown_architecture(setup, tmp_path, capsys):
    # One block per stage: shaped like a ResNet, but no torchvision model has these depths.
    state = {
        k: v
        for k, v in setup["model"].state_dict().items()
        if not (k.startswith("layer") and k.split(".")[1] == "1")
    }
    weights = tmp_path / "odd.pth"
    torch.save(state, weights)
    status, _, err = _run_main(capsys, setup["images"][0], "--weights", weights)
    assert status == 1
    _one_error_line(err, "not a known ResNet")


def test_folder_with_corrupt_file_exit_2(setup, tmp_path, capsys):
    out_json = tmp_path / "results.json"
    status, out, err = _run_main(
        capsys, setup["folder"], "--weights", setup["weights"], "--batch-size", "2",
        "--output", out_json,
    )  # fmt: skip
    assert status == EXIT_SKIPPED
    assert "broken.jpg" in err and "1 of 4 images" in err
    headers = [line for line in out.splitlines() if line.endswith(":")]
    assert headers == [f"{p}:" for p in setup["images"]]
    assert len(out.splitlines()) == 3 * (1 + len(CLASSES))
    records = json.loads(out_json.read_text())
    assert [r["image"] for r in records] == [str(p) for p in setup["images"]]


def test_save_plot_and_missing_matplotlib(setup, tmp_path, capsys, monkeypatch):
    predictions = [Prediction(str(setup["images"][0]), np.eye(5, dtype=np.float32)[3])]
    target = tmp_path / "plot.png"
    predict_output.plot(predictions, CLASSES, target, show=False)
    assert Image.open(target).format == "PNG"

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    status, _, err = _run_main(
        capsys, setup["images"][0], "--weights", setup["weights"], "--save-plot", target
    )
    assert status == 1
    _one_error_line(err, "matplotlib", "pip install")


def test_cli_end_to_end_json(setup, tmp_path):
    """One real process: JSON on stdout, CSV written, exit 2 for the skipped file, no traceback."""
    out_csv = tmp_path / "results.csv"
    result = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), str(setup["folder"]), str(setup["images"][1]),
         "--weights", str(setup["weights"]), "--json", "--top-k", "2", "--output", str(out_csv)],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == EXIT_SKIPPED, result.stderr
    assert "Traceback" not in result.stderr and "broken.jpg" in result.stderr
    records = json.loads(result.stdout)
    want = [str(p) for p in setup["images"]] + [str(setup["images"][1])]
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


def test_wrong_but_plausible_inputs_are_refused_before_any_work(setup, tmp_path, capsys):
    weights, image = setup["weights"], setup["images"][0]
    status, out, err = _run_main(capsys, image, "--weights", weights, "--save-plot", "x.xyz")
    assert status == 1 and out == ""  # checked before predicting and printing
    _one_error_line(err, "--save-plot x.xyz", "cannot write .xyz")

    status, out, err = _run_main(capsys, image, "--weights", weights, "--class-indices", tmp_path)
    assert status == 1 and out == ""
    _one_error_line(err, "Cannot read class index file", str(tmp_path))

    state = {k: v.detach().numpy().copy() for k, v in setup["model"].state_dict().items()}
    variables = torch_to_flax(state)
    variables["params"]["fc"]["bias"][0] = np.nan
    diverged = tmp_path / "diverged.msgpack"
    save_variables(diverged, variables)
    status, out, err = _run_main(capsys, image, "--weights", diverged, "--json")
    assert status == 1 and out == ""
    _one_error_line(err, "diverged.msgpack", "not finite")


def test_cam_writes_one_titled_png_per_image_and_leaves_stdout_as_it_was(setup, tmp_path, capsys):
    folder, weights = setup["folder"], setup["weights"]
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


def test_cam_maps_come_with_the_predictions(setup, predictor):
    paths = setup["images"]
    with_cam = predictor.predict_files(paths, batch_size=2, cam=True)
    without = predictor.predict_files(paths, batch_size=2)
    for a, b in zip(with_cam, without):
        assert a.image == b.image and b.cam is None
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
        assert a.cam.shape == (7, 7) and a.cam.max() == 1.0 and a.cam.min() >= 0.0


def test_cam_file_names_are_unique():
    predictions = [Prediction(p, np.ones(2)) for p in ["a/x.jpg", "b/x.png", "c/y.jpg", "x.jpg"]]
    assert predict_output._cam_names(predictions) == [
        "x.cam.png", "x-2.cam.png", "y.cam.png", "x-3.cam.png"
    ]  # fmt: skip


def test_cam_dir_that_cannot_be_made_is_refused_before_any_work(setup, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    status, out, err = _run_main(
        capsys, setup["images"][0], "--weights", setup["weights"], "--cam-dir", blocker / "cams"
    )
    assert status == 1 and out == ""
    _one_error_line(err, str(blocker / "cams"))


def test_progress_bar_on_stderr_only(setup, predictor, capsys, monkeypatch):
    predictor.predict_files(setup["images"], batch_size=2, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "3/3" in err
    predictor.predict_files(setup["images"], batch_size=2)  # few images: no bar
    assert capsys.readouterr() == ("", "")

    monkeypatch.setattr(inference, "PROGRESS_THRESHOLD", 3)
    status, out, err = _run_main(capsys, *setup["images"], "--weights", setup["weights"])
    assert status == 0 and "3/3" in err and "3/3" not in out
    assert all(line.startswith(("class: ", str(setup["folder"]))) for line in out.splitlines())


@pytest.mark.slow
def test_cli_cam_writes_into_gradcam_by_default(setup, tmp_path):
    image = setup["images"][1]
    result = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), str(image), "--weights", str(setup["weights"]),
         "--cam"],
        check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(CLASSES)
    assert Image.open(tmp_path / "gradcam" / "img1.cam.png").format == "PNG"
