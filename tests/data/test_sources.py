"""resnet_jax.data.sources: image folders laid out as torchvision's ImageFolder, splits, class files."""

from __future__ import annotations

import json

import pytest

from resnet_jax.data import sources
from resnet_jax.data.loader import open_datasets
from resnet_jax.runtime.errors import UserError
from tests.helpers import make_folder, noise_image


def test_classes_and_samples_match_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    root = make_folder(tmp_path / "train", {"b": 2, "A": 1, "c10": 1, "c2": 2}, ext=".JPG")
    make_folder(tmp_path / "val", {"b": 1, "A": 1, "c10": 1, "c2": 1}, ext=".Png")
    (root / "b" / "notes.txt").write_text("not an image")
    noise_image(9).save(root / "b" / "deeper.webp")  # extensions in any case, like torchvision
    train, val, classes = open_datasets(str(tmp_path))
    reference = ImageFolder(str(root))
    assert classes == reference.classes == ["A", "b", "c10", "c2"]
    assert train.samples == reference.samples
    assert [train.label(i) for i in range(len(train))] == [0, 1, 1, 1, 2, 3, 3]
    assert len(val) == 4 and val.classes == classes
    assert train.load(0).mode == "RGB" and train.name(0).endswith("img0.JPG")


def test_hidden_folders_are_not_classes(tmp_path):
    make_folder(tmp_path, {"cat": 3, "dog": 3, ".ipynb_checkpoints": 0})
    _, _, classes = open_datasets(str(tmp_path), val_fraction=0.34)
    assert classes == ["cat", "dog"]


def test_single_folder_split_is_deterministic_and_per_class(tmp_path):
    make_folder(tmp_path, {"cat": 10, "dog": 20})
    train, val, classes = open_datasets(str(tmp_path), val_fraction=0.2)
    assert classes == ["cat", "dog"]
    val_labels = [val.label(i) for i in range(len(val))]
    assert val_labels.count(0) == 2 and val_labels.count(1) == 4  # int(n * 0.2) per class
    assert len(train) == 24 and not set(train.samples) & set(val.samples)
    train2, val2, _ = open_datasets(str(tmp_path), val_fraction=0.2)
    assert train2.samples == train.samples and val2.samples == val.samples


def test_split_rule_ignores_listing_order_and_is_stable_under_additions():
    files = [f"/d/cat/{i}.jpg" for i in range(50)]
    _, val = sources.split_by_fraction(files, 0.1, "/d/cat")
    _, val_shuffled = sources.split_by_fraction(files[::-1], 0.1, "/d/cat")
    assert set(val) == set(val_shuffled) and len(val) == 5
    _, val_more = sources.split_by_fraction([*files, "/d/cat/new.jpg"], 0.1, "/d/cat")
    assert len(set(val) ^ set(val_more)) <= 2  # at most one file moved
    _, val_moved = sources.split_by_fraction([f"/e/x/{i}.jpg" for i in range(50)], 0.1, "/e/x")
    assert [v.replace("/e/x", "/d/cat") for v in val_moved] == val  # same split elsewhere


def _layout_missing_root(tmp):
    return tmp, "does not exist"  # nothing is created


def _layout_train_without_val(tmp):
    make_folder(tmp / "train", {"a": 1})
    return tmp, "has a train/ folder but no val/ folder"


def _layout_val_without_train(tmp):
    make_folder(tmp / "val", {"a": 1})
    return tmp, "has a val/ folder but no train/ folder"


def _layout_empty_class(tmp):
    make_folder(tmp / "train", {"a": 1, "b": 0})
    make_folder(tmp / "val", {"a": 1, "b": 1})
    (tmp / "train" / "b" / "readme.txt").write_text("no images here")
    return tmp / "train" / "b", "has no images"


def _layout_classes_differ(tmp):
    make_folder(tmp / "train", {"a": 1, "b": 1})
    make_folder(tmp / "val", {"a": 1, "c": 1})
    return tmp / "train", "different class folders (only in train: ['b']; only in val: ['c'])"


def _layout_no_images(tmp):
    tmp.mkdir(exist_ok=True)
    noise_image(0).save(tmp / "loose.png")  # images but no class folders
    return tmp, "has no class folders"


@pytest.mark.parametrize(
    "layout",
    [
        _layout_missing_root,
        _layout_train_without_val,
        _layout_val_without_train,
        _layout_empty_class,
        _layout_classes_differ,
        _layout_no_images,
    ],
)
def test_bad_layouts_raise_one_clear_sentence(tmp_path, layout):
    root = tmp_path / "data"
    named, expected = layout(root)
    with pytest.raises(UserError) as info:
        open_datasets(str(root))
    message = str(info.value)
    assert expected in message and str(named) in message
    assert "\n" not in message and message.endswith(".")


def test_val_fraction_that_leaves_no_val_images_is_an_error(tmp_path):
    make_folder(tmp_path, {"a": 1, "b": 1})  # a lone image stays in train
    with pytest.raises(UserError, match="leaves no validation images"):
        open_datasets(str(tmp_path), val_fraction=0.1)
    with pytest.raises(UserError, match="between 0 and 1"):
        open_datasets(str(tmp_path), val_fraction=1.5)


def test_class_indices_round_trip_in_the_original_format(tmp_path):
    path = tmp_path / "out" / "class_indices.json"
    sources.write_class_indices(path, ["daisy", "roses"])
    assert path.read_text() == json.dumps({"0": "daisy", "1": "roses"}, indent=4)
    assert sources.read_class_indices(path) == ["daisy", "roses"]
    assert [p.name for p in path.parent.iterdir()] == ["class_indices.json"]  # no temp left
    with pytest.raises(UserError, match="does not exist"):
        sources.read_class_indices(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"1": "daisy"}')
    with pytest.raises(UserError, match="not a class index file"):
        sources.read_class_indices(tmp_path / "bad.json")
    with pytest.raises(UserError, match="Cannot read class index file .*; pass a readable"):
        sources.read_class_indices(tmp_path)  # a folder
