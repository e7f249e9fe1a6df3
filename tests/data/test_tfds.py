"""resnet_jax.data.tfds: tfds data sets as sources, without network and without TensorFlow."""

from __future__ import annotations

import io
import socket
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from resnet_jax.data import sources
from resnet_jax.data import tfds as tfds_source
from resnet_jax.data.loader import Loader, open_datasets
from resnet_jax.data.transforms import BadImage, eval_transform_uint8
from resnet_jax.runtime.errors import UserError
from tests.helpers import batches, noise_image


def test_tfds_mock_data_gives_sources_and_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_source, "download_problem", lambda urls: None)
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
    with pytest.raises(UserError) as info:  # the probe answers; tfds's retries never start
        open_datasets(dataset="tf_flowers", tfds_dir=str(tmp_path))
    message = str(info.value)
    assert f"Cannot download tfds dataset 'tf_flowers' from {url}" in message
    assert "--data-dir" in message and "\n" not in message
    with pytest.raises(UserError, match="downloading is off"):
        open_datasets(dataset="tf_flowers", tfds_dir=str(tmp_path), download=False)
    with pytest.raises(UserError, match="no dataset named 'no_such_set'"):
        open_datasets(dataset="no_such_set", tfds_dir=str(tmp_path))


def test_download_problem_names_the_first_failing_url(http_server):
    served, base = http_server
    (served / "here.bin").write_bytes(b"x" * 1000)
    assert tfds_source.download_problem([f"{base}/here.bin"], timeout=5) is None
    assert tfds_source.download_problem([f"{base}/here.bin", f"{base}/gone"], timeout=5) == (
        f"{base}/gone (HTTP 404)"
    )
    refused = tfds_source.download_problem([f"http://127.0.0.1:{_closed_port()}/x"], timeout=5)
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


def cifar_archive(path, labels_by_file: dict[str, list[int]], classes: list[str]) -> dict:
    """A cifar-10-binary.tar.gz in the real layout: per record a label byte and a 3x32x32
    image; returns each file's images (HWC) for comparison."""
    rng = np.random.default_rng(0)
    images = {}
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, payload: bytes) -> None:
            member = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))

        for name, labels in labels_by_file.items():
            chw = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
            images[name] = chw.transpose(0, 2, 3, 1)
            add(name, b"".join(bytes([y]) + x.tobytes() for y, x in zip(labels, chw, strict=True)))
        add("batches.meta.txt", "\n".join(classes).encode() + b"\n\n")
    return images


def test_cifar10_prepares_and_reads_without_tensorflow(tmp_path, monkeypatch, http_server):
    """tfds's real CIFAR-10 builder on a fake 14-image archive served from 127.0.0.1: its
    extraction and its reader (tf.io.gfile in tfds) run without TensorFlow."""
    served, base = http_server
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]  # fmt: skip
    files = {f"data_batch_{i}.bin": [i, 9 - i] for i in range(1, 6)}
    files["test_batch.bin"] = [0, 1, 2, 3]
    images = cifar_archive(served / "cifar-10-binary.tar.gz", files, classes)
    from tensorflow_datasets.image_classification import cifar

    url = f"{base}/cifar-10-binary.tar.gz"
    info = cifar.Cifar10(data_dir=str(tmp_path / "probe"))._cifar_info._replace(url=url)
    monkeypatch.setattr(cifar.Cifar10, "_cifar_info", property(lambda self: info))
    monkeypatch.setattr(cifar.Cifar10, "url_infos", {url: None})
    train, val, got_classes = open_datasets(dataset="cifar10", tfds_dir=str(tmp_path / "tfds"))
    assert got_classes == classes
    assert (train.split, val.split, len(train), len(val)) == ("train", "test", 10, 4)
    train_labels = [y for name, labels in files.items() if name != "test_batch.bin" for y in labels]
    assert sorted(train.label(i) for i in range(10)) == sorted(train_labels)
    want = {label: image for label, image in zip(files["test_batch.bin"],
                                                 images["test_batch.bin"], strict=True)}  # fmt: skip
    for i in range(4):
        image, label = val.example(i)
        np.testing.assert_array_equal(np.asarray(image), want[label])
    (batch,) = batches(Loader(val, 4, train=False, image_size=32, resize_size=32, workers=1))
    assert batch["mask"].all() and batch["image"].shape == (4, 32, 32, 3)
    # Worker processes get the records' source pickled (array_record reopens its files).
    threads = batches(Loader(train, 6, train=True, image_size=16, workers=1))
    with Loader(train, 6, train=True, image_size=16, workers=2, processes=True) as loader:
        for ours, theirs in zip(batches(loader), threads, strict=True):
            np.testing.assert_array_equal(ours["image"], theirs["image"])
            np.testing.assert_array_equal(ours["label"], theirs["label"])
