"""resnet_jax.inference.evaluate: the scores against torch (with and without flip TTA), train.py's
validation numbers to the bit, classes matched by name, ImageNet's synset ids, the outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets.imagenette import Imagenette

from resnet_jax.inference import eval_result
from resnet_jax.inference.evaluate import EvalConfig, evaluate, match_classes, open_eval_data
from resnet_jax.inference.predictor import imagenet_classes, imagenet_wnids
from resnet_jax.models.registry import EvalTransform
from resnet_jax.runtime.errors import UserError
from resnet_jax.training.config import TrainConfig
from resnet_jax.training.trainer import train
from tests.helpers import make_folder, torch_resnet18, write_image

pytestmark = pytest.mark.usefixtures("private_compilation_cache")  # train() turns it on

# The model's class order differs from the sorted folder names, so matching by name matters;
# with seed 6 below, it predicts `daisy` most, a class without a folder.
MODEL_CLASSES = ["tulips", "roses", "daisy", "sunflowers", "dandelion", "lilies", "orchids"]
FOLDERS = ["roses", "dandelion", "tulips", "sunflowers"]  # by image seed: 3 * k + (0, 1, 2)
CROP, RESIZE = 32, 37  # 37 = round(32 * 256 / 224), the proportion --crop alone keeps


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 7-class torchvision resnet18 (.pth + class_indices.json) and 3 images for each of four
    of its classes, in three sizes, as ROOT/val/<class>/."""
    root = tmp_path_factory.mktemp("evaluate")
    model = torch_resnet18(len(MODEL_CLASSES), seed=6)
    weights = root / "model" / "resnet18.pth"
    weights.parent.mkdir()
    torch.save(model.state_dict(), weights)
    table = {str(i): name for i, name in enumerate(MODEL_CLASSES)}
    (weights.parent / "class_indices.json").write_text(json.dumps(table))
    sizes = [(40, 34), (30, 44), (36, 36)]
    for c, name in enumerate(FOLDERS):
        (root / "data" / "val" / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            write_image(root / "data" / "val" / name / f"{i}.png", size, seed=3 * c + i)
    return {"model": model, "weights": weights, "data": root / "data"}


def _torch_scores(model: torch.nn.Module, folder: Path, flip: bool) -> dict:
    """torchvision's eval transform and model on FOLDER/<class>/*, labels by MODEL_CLASSES."""
    tf = T.Compose([T.Resize(RESIZE), T.CenterCrop(CROP), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])  # fmt: skip
    paths = sorted(folder.glob("*/*.png"))
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    labels = torch.tensor([MODEL_CLASSES.index(p.parent.name) for p in paths])
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
        if flip:
            probs = (probs + torch.softmax(model(x.flip(3)), 1)) / 2
    predicted = probs.argmax(1)
    confusion = np.zeros((len(MODEL_CLASSES),) * 2, np.int64)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)
    return {
        "top1": int((predicted == labels).sum()) / len(paths),
        "top5": int((probs.topk(5).indices == labels[:, None]).any(1).sum()) / len(paths),
        "loss": float(-probs[torch.arange(len(labels)), labels].log().mean()),
        "confusion": confusion,
        "probs": probs.numpy(),
    }


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_scores_agree_with_torch(setup, tta):
    config = EvalConfig(weights=str(setup["weights"]), data_dir=str(setup["data"]), crop=CROP,
                        batch_size=5, tta=tta, workers=1)  # fmt: skip
    result = evaluate(config)  # 12 images in batches of 5: the last one is padded
    want = _torch_scores(setup["model"], setup["data"] / "val", flip=tta == "flip")
    assert result.data == str(setup["data"] / "val") and result.arch == "resnet18"
    assert result.folders == ("dandelion", "roses", "sunflowers", "tulips")
    assert result.labels == (4, 1, 3, 0)
    assert result.transform == EvalTransform(resize_size=RESIZE, crop_size=CROP)
    assert result.images == 12 and result.skipped == 0
    assert want["probs"].max(1).min() < 0.99  # not saturated: the loss is a real check
    assert 0 < result.top1 < result.top5 < 1
    assert (result.top1, result.top5) == (want["top1"], want["top5"])
    np.testing.assert_array_equal(result.confusion, want["confusion"])
    assert result.matrix()[1][-1] == eval_result.OTHER  # predictions of daisy
    np.testing.assert_allclose(result.loss, want["loss"], rtol=1e-5)


def test_flip_changes_the_scores(setup):
    """The images are not mirror-symmetric, so flipping must move the loss."""
    plain = _torch_scores(setup["model"], setup["data"] / "val", flip=False)
    flipped = _torch_scores(setup["model"], setup["data"] / "val", flip=True)
    assert abs(plain["loss"] - flipped["loss"]) > 1e-3


@pytest.mark.slow  # trains (one compilation of the train step)
def test_a_model_trained_here_scores_what_train_reported(tmp_path):
    """Same images, same batch size: evaluate's numbers equal metrics.jsonl's to the bit."""
    data = make_folder(tmp_path / "data" / "train", {"a": 4, "b": 4, "c": 4}, seed=1)
    make_folder(tmp_path / "data" / "val", {"a": 3, "b": 2, "c": 2}, seed=50)
    out = tmp_path / "run"
    config = TrainConfig(arch="resnet18", weights="none", data_dir=str(data.parent),
                         image_size=24, batch_size=4, epochs=1, workers=1, optimizer="sgd",
                         lr=1e-3, output_dir=str(out), no_tensorboard=True)  # fmt: skip
    train(config)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = evaluate(EvalConfig(weights=str(out / "best.msgpack"), data_dir=str(data.parent),
                                 batch_size=4, workers=1))  # fmt: skip
    assert result.transform.crop_size == 24 and result.images == 7
    assert result.top1 == record["val_accuracy"] and result.loss == record["val_loss"]
    accuracy = {row["class"]: row["accuracy"] for row in result.class_rows()}
    assert accuracy == record["val_class_accuracy"]


def test_classes_are_matched_by_name():
    assert match_classes(["daisy", "roses"], MODEL_CLASSES, "here") == [2, 1]
    with pytest.raises(UserError, match=r"here has 2 classes the model does not know \(x, y\)"):
        match_classes(["daisy", "x", "y"], MODEL_CLASSES, "here")
    with pytest.raises(UserError, match="carry no class names, so pass --class-indices"):
        match_classes(["daisy"], ["0", "1"], "here")
    # ImageNet's synset folders, or torchvision's names, for torchvision's 1000 classes.
    classes = imagenet_classes()
    assert match_classes(["n01443537", "n01440764", "great white shark"], classes, "x") == [1, 0, 2]
    with pytest.raises(UserError, match=r"n01440764 and tench name the same model class \(tench\)"):
        match_classes(["n01440764", "tench"], classes, "here")
    with pytest.raises(UserError, match="n01440764"):  # other classes have no synset ids
        match_classes(["n01440764"], MODEL_CLASSES, "here")


def test_imagenet_wnids_are_in_torchvision_order():
    """Sorted synset ids (ImageNet's folders sorted, torchvision's class order), copied from
    tensorflow-datasets' imagenet2012 labels.txt; torchvision's Imagenette names its 10."""
    wnids = imagenet_wnids()
    assert len(set(wnids)) == 1000 and wnids == sorted(wnids)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    labels = Path(tfds.__file__).parent / "datasets" / "imagenet2012" / "labels.txt"
    assert wnids == labels.read_text().split()
    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert imagenet_classes() == names
    for wnid, imagenette_names in Imagenette._WNID_TO_CLASS.items():
        assert names[wnids.index(wnid)] == imagenette_names[0]


def test_open_eval_data_picks_the_folder(tmp_path):
    make_folder(tmp_path / "flat", {"a": 1, "b": 1})
    make_folder(tmp_path / "split" / "val", {"a": 1})
    make_folder(tmp_path / "split" / "test", {"b": 2})
    source, where = open_eval_data(str(tmp_path / "flat"), None, None)
    assert where == str(tmp_path / "flat") and source.classes == ["a", "b"] and len(source) == 2
    assert open_eval_data(str(tmp_path / "split"), None, None)[0].classes == ["a"]
    assert len(open_eval_data(str(tmp_path / "split"), None, "test")[0]) == 2
    with pytest.raises(UserError, match="has no train/ folder"):
        open_eval_data(str(tmp_path / "split"), None, "train")
    with pytest.raises(UserError, match="either --data-dir ROOT .* or --dataset NAME"):
        open_eval_data(None, None, None)
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no images"):
        open_eval_data(str(tmp_path / "flat"), None, None)


class EvalTinyShapes(tfds.core.GeneratorBasedBuilder):
    """A tfds dataset that prepares without network or TensorFlow: raw uint8 images, 2 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"image": tfds.features.Tensor(shape=(20, 24, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=["b", "a"])}  # fmt: skip
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

    def _generate_examples(self, n: int):
        rng = np.random.default_rng(n)
        for i in range(n):
            yield i, {"image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "label": i % 2}


def test_open_eval_data_reads_a_tfds_split(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    EvalTinyShapes(file_format="array_record").download_and_prepare(file_format="array_record")
    source, where = open_eval_data(None, "eval_tiny_shapes", None)
    assert where == "tfds eval_tiny_shapes test" and len(source) == 3  # what train.py validates on
    assert source.classes == ["b", "a"]
    assert sorted(source.example(i)[1] for i in range(3)) == [0, 0, 1]
    source, where = open_eval_data(None, "eval_tiny_shapes", "train[:50%]")
    assert where == "tfds eval_tiny_shapes train[:50%]" and len(source) == 3
    for split in ("validation", "train[:abc]"):
        with pytest.raises(UserError, match=r"has no split .* \(its splits: test, train\)"):
            open_eval_data(None, "eval_tiny_shapes", split)


def _result(confusion: np.ndarray, labels: tuple[int, ...]) -> eval_result.EvalResult:
    folders = tuple(f"f{i}" for i in labels)
    return eval_result.EvalResult(
        weights="w.msgpack", data="here", arch="resnet18", classes=("p", "q", "r", "s"),
        folders=folders, labels=labels, confusion=confusion, loss=0.5, top1=0.25, top5=1.0,
        images=int(confusion.sum()), skipped=1, transform=EvalTransform(), tta="flip",
    )  # fmt: skip


def test_matrix_rows_and_outputs(tmp_path):
    # counts[true, predicted] over the model's 4 classes; the data has classes r and p.
    confusion = np.array([[1, 0, 2, 1], [0] * 4, [3, 0, 0, 0], [0] * 4])
    result = _result(confusion, (2, 0))
    matrix, names = result.matrix()
    assert names == ["r", "p", eval_result.OTHER]
    np.testing.assert_array_equal(matrix, [[0, 3, 0], [2, 1, 1], [0, 0, 0]])
    assert result.class_rows() == [
        {"class": "r", "folder": "f2", "index": 2, "images": 3, "correct": 0, "accuracy": 0.0},
        {"class": "p", "folder": "f0", "index": 0, "images": 4, "correct": 1, "accuracy": 0.25},
    ]
    assert result.summary() == (
        "resnet18 on here: top1 25.000% top5 100.000% loss 0.5000 "
        "(7 images, 2 classes of the model's 4, tta flip, 1 unreadable skipped)"
    )
    # Without predictions outside the data's classes, no OTHER row or column.
    square = _result(np.array([[2, 1, 0, 0], [0, 3, 0, 0], [0] * 4, [0] * 4]), (1, 0))
    assert square.matrix()[1] == ["q", "p"]
    np.testing.assert_array_equal(square.matrix()[0], [[3, 0], [1, 2]])

    eval_result.write_result(tmp_path / "r.csv", result)
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert tuple(rows[0]) == eval_result.CSV_COLUMNS and rows[1]["accuracy"] == "0.25"
    eval_result.write_result(tmp_path / "r.json", result)
    document = json.loads((tmp_path / "r.json").read_text())
    assert document == json.loads(json.dumps(result.to_dict()))
    assert document["confusion"]["matrix"][1] == [2, 1, 1] and document["top1"] == 0.25
    eval_result.write_confusion_png(tmp_path / "m.png", result)
    assert Image.open(tmp_path / "m.png").format == "PNG"
