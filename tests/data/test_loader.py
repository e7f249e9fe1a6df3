"""resnet_jax.data.loader on tiny images made here: order, resume, shards, padding, bad images."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from torchvision import transforms as tv

from resnet_jax.data import sources
from resnet_jax.data.loader import Loader, open_datasets
from resnet_jax.data.train_transform import TrainTransform
from resnet_jax.data.transforms import eval_transform_uint8, random_resized_crop_flip
from resnet_jax.runtime.errors import UserError
from tests.data.worker_probe import Hungry, JaxProbe, Killer
from tests.helpers import batches, make_folder, photo_like

REPO = Path(__file__).resolve().parents[2]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(x[key], y[key])


def test_one_class_is_refused_before_training(tmp_path):
    make_folder(tmp_path, {"daisy": 10})
    with pytest.raises(UserError, match=r"has only one class \(daisy\); a classifier needs"):
        open_datasets(str(tmp_path))


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


@pytest.mark.parametrize("processes", [False, True])
def test_bad_images_are_skipped_with_a_warning_and_counted(tmp_path, caplog, processes):
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
    loader = Loader(source, 4, train=False, image_size=16, workers=2, processes=processes)
    with caplog.at_level(logging.WARNING, logger="resnet_jax.data.loader"):
        out = batches(loader)
    loader.close()
    assert loader.skipped == 2
    masks = np.concatenate([b["mask"] for b in out])
    assert masks.tolist() == [True, False, True, True, True, True, False, True]
    assert not np.concatenate([b["image"] for b in out])[~masks].any()
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(garbage) in m for m in messages) and any(str(truncated) in m for m in messages)
    assert all("\n" not in m for m in messages)
    assert "2 unreadable image(s) skipped in epoch 0" in messages[-1]
    with Loader(source, 4, train=True, image_size=16, workers=1, processes=processes) as train:
        batches(train)  # train skips them too
        assert train.skipped >= 1


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
        "from resnet_jax.data.loader import Loader\nfrom resnet_jax.data.sources import open_image_folder\n"
        f"train, _, _ = open_image_folder({str(tmp_path / 'images')!r}, 0.5)\n"
        "epoch = Loader(train, 2, train=True, image_size=16, workers=2, prefetch=2).epoch(0)\n"
        "next(epoch)\n"  # exit with the generator still referenced and work queued
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == ""


def test_default_train_transform_is_the_imagenet_crop_and_flip(folder):
    """The crops of each (seed, epoch, index) are those the Loader has always made."""
    train, _, _ = folder
    loader = Loader(train, 4, train=True, image_size=16, seed=3, workers=2)
    for epoch in (0, 1):
        images = np.concatenate([b["image"] for b in batches(loader, epoch)])
        for row, i in enumerate(loader.indices(epoch).ravel()):
            rng = np.random.default_rng((3, epoch, 2, i))
            want = random_resized_crop_flip(train.load(i), 16, rng)
            np.testing.assert_array_equal(images[row], want)


def test_the_train_transform_is_applied_per_image(folder):
    train, _, _ = folder
    transform = TrainTransform(crop="pad_crop", auto_augment="ta_wide")
    loader = Loader(train, 4, train=True, image_size=16, seed=3, workers=2, transform=transform)
    images = np.concatenate([b["image"] for b in batches(loader, 1)])
    for row, i in enumerate(loader.indices(1).ravel()):
        want = transform(train.load(i), 16, np.random.default_rng((3, 1, 2, i)))
        np.testing.assert_array_equal(images[row], want)


def ra_sampler(order: list[int], replicas: int, rank: int, reps: int, selected: int) -> list[int]:
    """torchvision's RASampler.__iter__ from its shuffled `order` on: each index `reps` times in
    a row, wrapped round to a multiple of `replicas`, every `replicas`-th from `rank`, the first
    `selected` (RASampler's own length rounds the dataset down to a multiple of 256)."""
    indices = [i for i in order for _ in range(reps)]
    total = math.ceil(len(order) * reps / replicas) * replicas
    indices += indices[: total - len(indices)]
    return indices[rank:total:replicas][:selected]


@pytest.mark.parametrize("processes, reps", [(1, 2), (2, 2), (2, 3), (3, 3), (3, 4), (6, 2)])
def test_repeated_augmentation_deals_out_like_torchvisions_ra_sampler(folder, processes, reps):
    train, _, _ = folder
    batch = 6
    plain = Loader(train, batch, train=True, seed=4).indices(2).ravel().tolist()
    order = plain + sorted(set(range(len(train))) - set(plain))  # the permutation of all 12
    b = batch // processes
    for p in range(processes):
        loader = Loader(
            train, batch, train=True, seed=4, process_index=p, process_count=processes, repeats=reps
        )
        assert len(loader) == 2  # the epoch keeps its length
        mine = loader.indices(2)[:, p * b : (p + 1) * b].ravel().tolist()
        assert mine == ra_sampler(order, processes, p, reps, len(loader) * b)
    # Each image's copies sit on different processes while there are enough of them.
    owners: dict[int, list[int]] = {}
    for row in loader.indices(2):
        for column, i in enumerate(row):
            owners.setdefault(int(i), []).append(column // b)
    assert all(len(set(o)) == min(len(o), processes) for o in owners.values())


@pytest.mark.parametrize("processes", [1, 2])
def test_repeated_copies_get_their_own_augmentations(folder, processes):
    train, _, _ = folder
    common = {"train": True, "image_size": 16, "seed": 2, "repeats": 3, "process_count": processes}
    parts = [
        batches(Loader(train, 6, workers=2, process_index=p, **common)) for p in range(processes)
    ]
    rows = Loader(train, 6, **common).indices(0).ravel()
    if processes == 1:
        assert rows.tolist() == np.repeat(rows[::3], 3).tolist()  # copies side by side
    out = [{k: np.concatenate([part[b][k] for part in parts]) for k in parts[0][b]} for b in (0, 1)]
    images = np.concatenate([b["image"] for b in out])
    assert np.concatenate([b["label"] for b in out]).tolist() == [train.label(i) for i in rows]
    for i in set(rows.tolist()):
        copies = images[rows == i]
        assert len(copies) > 1 and len({c.tobytes() for c in copies}) == len(copies)
        # One copy is the image repeats=1 would have made.
        want = random_resized_crop_flip(train.load(i), 16, np.random.default_rng((2, 0, 2, i)))
        assert any(np.array_equal(c, want) for c in copies)


def test_repeated_augmentation_resumes_exactly_and_ignores_worker_count(folder):
    train, _, _ = folder
    one = Loader(train, 4, train=True, image_size=16, seed=1, workers=1, repeats=2, prefetch=1)
    three = Loader(train, 4, train=True, image_size=16, seed=1, workers=3, repeats=2)
    full = batches(one, epoch=3)
    assert len(full) == 3
    assert_same(batches(three, epoch=3), full)
    assert_same(batches(three, epoch=3, start=1), full[1:])


def test_repeats_must_be_positive_and_for_training(folder):
    train, val, _ = folder
    with pytest.raises(ValueError, match="repeats must be 1, or more for training, not 0"):
        Loader(train, 4, train=True, repeats=0)
    with pytest.raises(ValueError, match="not 2"):
        Loader(val, 4, train=False, repeats=2)


def test_cifar_eval_at_32_pixels_is_the_identity(tmp_path):
    """Eval without resize or crop: `resize_size=32` with image size 32 leaves 32x32 images as they are."""
    for i in range(5):
        (tmp_path / "a").mkdir(exist_ok=True)
        photo_like(32, 32, seed=i).save(tmp_path / "a" / f"{i}.png")
    source = sources.ImageFolderSource(
        [(str(tmp_path / "a" / f"{i}.png"), 0) for i in range(5)], ["a"]
    )
    for i in range(5):
        image = source.load(i)
        np.testing.assert_array_equal(eval_transform_uint8(image, 32, 32), np.asarray(image))
    loader = Loader(source, 2, train=False, image_size=32, resize_size=32, workers=2)
    images = np.concatenate([b["image"] for b in batches(loader)])[:5]
    np.testing.assert_array_equal(images, np.stack([np.asarray(source.load(i)) for i in range(5)]))
    # Without resize_size the eval resize is ImageNet's 256/224 proportion: 37, not the identity.
    assert Loader(source, 2, train=False, image_size=32).resize_size == 37


def test_separate_train_crop_and_eval_resize_and_crop(folder):
    """torchvision's V2 recipe: --train-crop 176, --eval-resize 232, --eval-crop 224."""
    train, val, _ = folder
    out = batches(Loader(train, 4, train=True, image_size=176, workers=2))
    assert out[0]["image"].shape == (4, 176, 176, 3)
    loader = Loader(val, 4, train=False, image_size=224, resize_size=232, workers=2)
    images = np.concatenate([b["image"] for b in batches(loader)])
    reference = tv.Compose([tv.Resize(232), tv.CenterCrop(224)])
    for i in range(len(val)):
        np.testing.assert_array_equal(images[i], np.asarray(reference(val.load(i))))


@pytest.mark.parametrize("train", [True, False])
def test_worker_processes_give_the_batches_threads_give(folder, train):
    source = folder[0] if train else folder[1]
    want = batches(Loader(source, 3, train=train, image_size=16, seed=7, workers=1), epoch=2)
    loader = Loader(
        source, 3, train=train, image_size=16, seed=7, workers=2, prefetch=1, processes=True
    )
    with loader:
        # 4 or 3 batches through a ring of 2 slots; eval's last holds padding after real rows.
        assert_same(batches(loader, epoch=2), want)
        pids = loader._process_workers.pids
        assert_same(batches(loader, epoch=2), want)  # the same processes, another epoch
        assert loader._process_workers.pids == pids
    for pid in pids:  # closing ended and reaped them
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_an_epoch_left_open_does_not_disturb_the_next(folder):
    train, _, _ = folder
    want = batches(Loader(train, 2, train=True, image_size=16, workers=1), epoch=1)
    with Loader(train, 2, train=True, image_size=16, workers=2, processes=True) as loader:
        epoch = loader.epoch(0)
        next(epoch)
        epoch.close()  # tasks still in flight: the next epoch must not get their rows
        assert_same(batches(loader, epoch=1), want)
        stale = loader.epoch(0)
        next(stale)
        assert_same(batches(loader, epoch=1), want)  # starting an epoch ends the open one
        with pytest.raises(RuntimeError, match="another epoch of this Loader started"):
            next(stale)


def test_worker_processes_import_no_jax_and_exit_quietly():
    script = (
        "import jax.numpy as jnp\n"
        "jnp.zeros(2).block_until_ready()\n"  # JAX's threads now run in this process
        "from resnet_jax.data.loader import Loader\n"
        "from tests.data.worker_probe import JaxProbe\n"
        "loader = Loader(JaxProbe(8), 2, train=False, image_size=8, workers=2, processes=True)\n"
        "epoch = loader.epoch(0)\n"
        "print(*next(epoch)['label'])\n"  # exit with the epoch open and work in flight
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.split() == ["0", "0"]  # labelled in the workers: no JAX there


def test_a_killed_worker_process_is_a_user_error():
    loader = Loader(Killer(8, fatal=5), 2, train=False, image_size=8, workers=2, processes=True)
    with pytest.raises(UserError, match=r"worker process was killed by SIGKILL.*lower --workers"):
        batches(loader)
    assert loader._process_workers.closed  # the others are ended too
    with Loader(JaxProbe(4), 2, train=False, image_size=8, processes=True) as healthy:
        assert len(batches(healthy)) == 2


def test_a_worker_process_out_of_memory_is_a_memory_error():
    """Not the RuntimeError of a bug: the command lines turn it into their out-of-memory line."""
    loader = Loader(Hungry(8, fatal=5), 2, train=False, image_size=8, workers=2, processes=True)
    with loader, pytest.raises(MemoryError, match="worker process: MemoryError: Unable to alloc"):
        batches(loader)


def test_a_source_worker_processes_cannot_receive_is_a_user_error(folder):
    train, _, _ = folder
    train.lock = threading.Lock()  # cannot be pickled
    loader = Loader(train, 2, train=True, image_size=16, processes=True)
    with pytest.raises(UserError, match=r"cannot be sent to worker processes .*--worker-threads"):
        next(loader.epoch(0))


def test_eval_batches_of_jpegs_stay_bit_identical_to_torchvision(tmp_path):
    """Reduced decoding is for training crops only: eval decodes in full, in every worker."""
    from torchvision import transforms as tv
    from torchvision.datasets.folder import pil_loader

    make_folder(tmp_path / "train", {"a": 2, "b": 2}, ext=".jpg")
    make_folder(tmp_path / "val", {"a": 3, "b": 3}, ext=".jpg", seed=50)
    for path in (tmp_path / "val").rglob("*.jpg"):  # photos large enough for a 1/8 decode
        pil_loader(path).resize((400, 300)).save(path, quality=90)
    _, val, _ = open_datasets(str(tmp_path))
    reference = tv.Compose([tv.Resize(37), tv.CenterCrop(32)])
    want = np.stack([np.asarray(reference(pil_loader(path))) for path, _ in val.samples])
    for processes in (False, True):
        with Loader(val, 3, train=False, image_size=32, workers=2, processes=processes) as loader:
            assert loader.examples.reduced_decode is False
            got = np.concatenate([b["image"] for b in batches(loader)])
        np.testing.assert_array_equal(got, want)
