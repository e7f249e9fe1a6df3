"""resnet_jax.data and resnet_jax.tfds_source on tiny images made here, tfds without network."""

from __future__ import annotations

import functools
import http.server
import io
import json
import logging
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax import sources, tfds_source
from resnet_jax.data import Loader, open_datasets
from resnet_jax.errors import UserError
from resnet_jax.transforms import BadImage, eval_transform_uint8


def noise_image(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_folder(root: Path, counts: dict[str, int], ext: str = ".png", seed: int = 0) -> Path:
    """root/<class>/<i><ext> noise images, a distinct seed per file."""
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            noise_image(seed + 100 * c + i).save(root / name / f"img{i}{ext}")
    return root


def batches(loader: Loader, epoch: int = 0, start: int = 0) -> list[dict[str, np.ndarray]]:
    return list(loader.epoch(epoch, start))


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(x[key], y[key])


# ---------------------------------------------------------------- ImageFolder layouts and errors


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


def test_one_class_is_refused_before_training(tmp_path):
    make_folder(tmp_path, {"daisy": 10})
    with pytest.raises(UserError, match=r"has only one class \(daisy\); a classifier needs"):
        open_datasets(str(tmp_path))


# ---------------------------------------------------------------- Loader


@pytest.fixture
def folder(tmp_path):
    """12 training images in 3 classes and 7 eval images."""
    make_folder(tmp_path / "train", {"a": 4, "b": 4, "c": 4})
    make_folder(tmp_path / "val", {"a": 3, "b": 2, "c": 2}, seed=1000)
    return open_datasets(str(tmp_path))


def test_train_epoch_shape_order_and_drop_last(folder):
    train, _, _ = folder
    loader = Loader(train, 5, train=True, image_size=16, seed=3, workers=2)
    assert len(loader) == 2  # 12 // 5, the partial batch dropped
    epoch0 = batches(loader, 0)
    batch = epoch0[0]
    assert batch["image"].shape == (5, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["mask"].all()
    rows = loader.indices(0).ravel()
    assert len(set(rows)) == 10 and set(rows) <= set(range(12))
    assert [b["label"].tolist() for b in epoch0] == [
        [train.label(i) for i in r] for r in loader.indices(0)
    ]
    assert not np.array_equal(loader.indices(0), loader.indices(1))  # reshuffled each epoch
    np.testing.assert_array_equal(
        loader.indices(1), Loader(train, 5, train=True, seed=3).indices(1)
    )


def test_batches_do_not_depend_on_worker_count(folder):
    train, _, _ = folder
    one = batches(Loader(train, 4, train=True, image_size=16, seed=7, workers=1), epoch=2)
    three = batches(Loader(train, 4, train=True, image_size=16, seed=7, workers=3), epoch=2)
    assert_same(one, three)
    other_seed = batches(Loader(train, 4, train=True, image_size=16, seed=8, workers=1), epoch=2)
    assert not np.array_equal(one[0]["image"], other_seed[0]["image"])


def test_resume_at_batch_k_equals_the_tail_of_a_full_epoch(folder):
    train, _, _ = folder
    loader = Loader(train, 3, train=True, image_size=16, seed=1, workers=2, prefetch=1)
    full = batches(loader, epoch=4)
    assert len(full) == 4
    assert_same(batches(loader, epoch=4, start=2), full[2:])


def test_eval_pads_and_masks_so_each_image_counts_once(folder):
    _, val, _ = folder
    loader = Loader(val, 3, train=False, image_size=16, workers=2)
    assert len(loader) == 3  # 7 images: 3 + 3 + 1 real rows
    out = batches(loader)
    masks = np.concatenate([b["mask"] for b in out])
    assert masks.tolist() == [True] * 7 + [False] * 2
    labels = np.concatenate([b["label"] for b in out])[masks]
    assert labels.tolist() == [val.label(i) for i in range(7)]
    images = np.concatenate([b["image"] for b in out])
    from resnet_jax.transforms import eval_transform_uint8

    for i in range(7):
        np.testing.assert_array_equal(images[i], eval_transform_uint8(val.load(i), 16))
    assert not images[7:].any()


@pytest.mark.parametrize("train", [True, False])
def test_process_shards_concatenate_to_the_global_batch(folder, train):
    source = folder[0] if train else folder[1]
    whole = batches(Loader(source, 4, train=train, image_size=16, seed=5, workers=2))
    parts = [
        batches(
            Loader(
                source,
                4,
                train=train,
                image_size=16,
                seed=5,
                workers=1,
                process_index=p,
                process_count=2,
            )
        )
        for p in (0, 1)
    ]
    for k, batch in enumerate(whole):
        for key in ("image", "label", "mask"):
            assert parts[0][k][key].shape[0] == 2
            np.testing.assert_array_equal(
                np.concatenate([parts[0][k][key], parts[1][k][key]]), batch[key]
            )


def test_batch_size_must_divide_among_processes_and_fit_the_data(folder):
    train, _, _ = folder
    with pytest.raises(UserError, match="multiple of the 4 processes"):
        Loader(train, 6, train=True, process_count=4)
    with pytest.raises(UserError, match="larger than the 12 training images"):
        Loader(train, 16, train=True)


def test_bad_images_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
    make_folder(tmp_path, {"a": 4, "b": 4}, ext=".jpg")
    garbage = tmp_path / "a" / "img1.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "b" / "img2.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tmp_path / "train").mkdir()
    source = sources.ImageFolderSource(
        [(str(tmp_path / c / f"img{i}.jpg"), int(c == "b")) for c in "ab" for i in range(4)],
        ["a", "b"],
    )
    loader = Loader(source, 4, train=False, image_size=16, workers=2)
    with caplog.at_level(logging.WARNING, logger="resnet_jax.data"):
        out = batches(loader)
    assert loader.skipped == 2
    masks = np.concatenate([b["mask"] for b in out])
    assert masks.tolist() == [True, False, True, True, True, True, False, True]
    assert not np.concatenate([b["image"] for b in out])[~masks].any()
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(garbage) in m for m in messages) and any(str(truncated) in m for m in messages)
    assert all("\n" not in m for m in messages)
    assert "2 unreadable image(s) skipped in epoch 0" in messages[-1]
    batches(Loader(source, 4, train=True, image_size=16, workers=1))  # train skips them too


def test_stopping_early_shuts_the_worker_threads_down(folder):
    train, _, _ = folder
    epoch = Loader(train, 2, train=True, image_size=16, workers=3, prefetch=3).epoch(0)
    next(epoch)
    assert any(t.name.startswith("resnet_jax-data") for t in threading.enumerate())
    epoch.close()  # what `break` out of a for loop does once the generator is dropped
    assert not any(t.name.startswith("resnet_jax-data") for t in threading.enumerate())


def test_exiting_mid_epoch_neither_hangs_nor_prints(tmp_path):
    make_folder(tmp_path / "images", {"a": 6, "b": 6})
    script = (
        "from resnet_jax.data import Loader\nfrom resnet_jax.sources import open_image_folder\n"
        f"train, _, _ = open_image_folder({str(tmp_path / 'images')!r}, 0.5)\n"
        "epoch = Loader(train, 2, train=True, image_size=16, workers=2, prefetch=2).epoch(0)\n"
        "next(epoch)\n"  # exit with the generator still referenced and work queued
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == ""


# ---------------------------------------------------------------- tensorflow-datasets


def test_tfds_mock_data_gives_sources_and_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, "check_download", lambda urls: None)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        train, val, classes = open_datasets(dataset="tf_flowers", tfds_dir=str(tmp_path))
        assert classes == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
        assert (train.split, val.split) == ("train[:-10%]", "train[-10%:]")
        assert len(train) == 6 and train.name(2) == "train[:-10%][2]"
        image, label = train.example(0)
        assert image.mode == "RGB" and 0 <= label < 5 and train.label(0) == label
        loader = Loader(train, 4, train=True, image_size=16, workers=2)
        (batch,) = batches(loader)
        assert batch["image"].shape == (4, 16, 16, 3) and batch["mask"].all()


def test_an_over_budget_tfds_record_is_named_in_the_message():
    records = [{"image": np.zeros((1, 5000, 3), np.uint8), "label": 0}]
    source = tfds_source.TfdsSource(records, ["a", "b"], "train[-10%:]")
    with pytest.raises(BadImage, match=r"^train\[-10%:\]\[0\] is not a readable image"):
        eval_transform_uint8(source.load(0), 224)


def test_val_count_follows_the_seed():
    # tf_flowers' classes: the original split_data.py keeps int(n * 0.1) of each for val.
    flowers = {"daisy": 633, "dandelion": 898, "roses": 641, "sunflowers": 699, "tulips": 799}
    assert sum(sources.val_count(n, 0.1) for n in flowers.values()) == 364
    assert [sources.val_count(n, 0.1) for n in (0, 1, 2, 5, 19, 20)] == [0, 0, 1, 1, 1, 2]


def test_tfds_split_names():
    assert tfds_source.split_names({"train": 1}, 0.25) == ("train[:-25%]", "train[-25%:]")
    assert tfds_source.split_names({"train": 1, "validation": 1}, 0.1) == ("train", "validation")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tfds_offline_fails_fast_with_one_clear_line(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/flower_photos.tgz"  # nothing listens there
    builder_cls = type(tfds.builder("tf_flowers", data_dir=str(tmp_path)))
    monkeypatch.setattr(builder_cls, "url_infos", {url: None})

    def must_not_run(*args, **kwargs):
        raise AssertionError("download_and_prepare must not start when the host is unreachable")

    monkeypatch.setattr(builder_cls, "download_and_prepare", must_not_run)
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        open_datasets(dataset="tf_flowers", tfds_dir=str(tmp_path))
    assert time.monotonic() - started < 30
    message = str(info.value)
    assert f"Cannot download tfds dataset 'tf_flowers' from {url}" in message
    assert "--data-dir" in message and "\n" not in message
    with pytest.raises(UserError, match="downloading is off"):
        open_datasets(dataset="tf_flowers", tfds_dir=str(tmp_path), download=False)
    with pytest.raises(UserError, match="no dataset named 'no_such_set'"):
        open_datasets(dataset="no_such_set", tfds_dir=str(tmp_path))


@pytest.fixture
def http_server(tmp_path):
    """(folder, base url) of a local HTTP server."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_check_download_reports_the_first_failing_url(http_server):
    served, base = http_server
    (served / "here.bin").write_bytes(b"x" * 1000)
    assert tfds_source.check_download([f"{base}/here.bin"], timeout=5) is None
    assert tfds_source.check_download([f"{base}/here.bin", f"{base}/gone"], timeout=5) == (
        f"{base}/gone (HTTP 404)"
    )
    refused = tfds_source.check_download([f"http://127.0.0.1:{_closed_port()}/x"], timeout=5)
    assert "refused" in refused.lower()


def test_tf_flowers_prepares_and_reads_without_tensorflow(tmp_path, monkeypatch, http_server):
    """The real tf_flowers builder on a fake 20-image archive served from 127.0.0.1."""
    served, base = http_server
    with tarfile.open(served / "flower_photos.tgz", "w:gz") as tar:
        for c, name in enumerate(["dandelion", "daisy", "tulips", "sunflowers", "roses"]):
            for i in range(4):
                buffer = io.BytesIO()
                noise_image(10 * c + i).save(buffer, "JPEG")
                member = tarfile.TarInfo(f"flower_photos/{name}/{i}.jpg")
                member.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(member, buffer)
    url = f"{base}/flower_photos.tgz"
    from tensorflow_datasets.datasets.tf_flowers import tf_flowers_dataset_builder as module

    monkeypatch.setattr(module, "_URL", url)
    monkeypatch.setattr(module.Builder, "url_infos", {url: None})  # probe our server
    train, val, classes = open_datasets(dataset="tf_flowers", tfds_dir=str(tmp_path / "tfds"))
    assert classes == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
    assert (len(train), len(val)) == (18, 2)
    labels = [train.label(i) for i in range(18)] + [val.label(i) for i in range(2)]
    assert sorted(labels) == [c for c in range(5) for _ in range(4)]
    (batch,) = batches(Loader(val, 2, train=False, image_size=16, workers=1))
    assert batch["mask"].all()
