"""Datasets: the embedded ones, the IDX and CIFAR-10 parsers on files written here, the
checksum and error paths, and the batch loader's determinism. Nothing here uses a network.
"""

import gzip
import hashlib
import io
import tarfile

import numpy as np
import pytest

from rbprop import data
from rbprop.data import BatchLoader, DatasetError, load_dataset

# -- the embedded datasets ----------------------------------------------------------


def test_mnist5k_is_a_fixed_balanced_4000_1000_split():
    first, second = load_dataset("mnist5k"), load_dataset("mnist5k")
    assert first.train_images.shape == (4000, 1, 28, 28)
    assert first.test_images.shape == (1000, 1, 28, 28)
    assert first.train_images.dtype == np.float32 and first.train_labels.dtype == np.int64
    assert first.train_images.min() >= 0.0 and first.train_images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(first.test_labels), [100] * 10)
    np.testing.assert_array_equal(first.test_images, second.test_images)
    np.testing.assert_array_equal(first.train_labels, second.train_labels)
    # no image is in both splits
    train_keys = {image.tobytes() for image in first.train_images}
    assert not any(image.tobytes() in train_keys for image in first.test_images)


def test_digits_and_synthetic():
    digits = load_dataset("digits")
    assert digits.image_shape == (1, 8, 8)
    assert len(digits.train_labels) + len(digits.test_labels) == 1797
    assert digits.train_images.max() == 1.0
    synthetic = load_dataset("synthetic")
    again = load_dataset("synthetic")
    assert synthetic.image_shape == (1, 28, 28) and synthetic.num_classes == 10
    np.testing.assert_array_equal(synthetic.train_images, again.train_images)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="mnist5k"):
        load_dataset("imagenet")


def test_a_corrupt_embedded_csv_names_the_file(tmp_path, monkeypatch):
    broken = tmp_path / "mnist_5k.csv.gz"
    broken.write_bytes(gzip.compress(b"1,2,3\n")[:-6])
    monkeypatch.setattr(data, "_package_file", lambda *args: broken)
    with pytest.raises(DatasetError, match="mnist_5k.csv.gz.*reinstall"):
        load_dataset("mnist5k")


# -- IDX files (MNIST, Fashion-MNIST) ------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: two zero bytes, type 0x08 (uint8), rank, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def idx_dir(tmp_path, monkeypatch):
    """A small MNIST-format cache in ``tmp_path/mnist`` whose digests are registered."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (6, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 6),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (4, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 4),
    }
    directory = tmp_path / "mnist"
    directory.mkdir()
    checksums = {}
    for name, array in arrays.items():
        payload = gzip.compress(idx_bytes(array))
        (directory / name).write_bytes(payload)
        checksums[name] = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(data.CHECKSUMS, "mnist", checksums)
    return tmp_path, arrays


def test_idx_files_are_parsed(idx_dir):
    root, arrays = idx_dir
    dataset = load_dataset("mnist", root=root)
    assert dataset.train_images.shape == (6, 1, 28, 28)
    np.testing.assert_allclose(
        dataset.train_images[:, 0] * 255, arrays["train-images-idx3-ubyte.gz"], atol=1e-4
    )
    np.testing.assert_array_equal(dataset.test_labels, arrays["t10k-labels-idx1-ubyte.gz"])


def test_the_cache_directory_comes_from_the_environment(idx_dir, monkeypatch):
    root, _ = idx_dir
    monkeypatch.setenv("RBPROP_DATA", str(root))
    assert data.data_dir() == root
    assert len(load_dataset("mnist").test_labels) == 4


def test_a_corrupt_file_fails_its_checksum_naming_the_file(idx_dir):
    root, _ = idx_dir
    path = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    payload = bytearray(path.read_bytes())
    payload[-3] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz is corrupt.*--download"):
        load_dataset("mnist", root=root)


def test_a_missing_file_says_where_to_put_it(idx_dir):
    root, _ = idx_dir
    (root / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz is missing.*--download"):
        load_dataset("mnist", root=root)


def test_a_truncated_idx_file_is_refused_even_with_a_matching_digest(idx_dir, monkeypatch):
    root, arrays = idx_dir
    path = root / "mnist" / "train-images-idx3-ubyte.gz"
    payload = gzip.compress(idx_bytes(arrays["train-images-idx3-ubyte.gz"])[:-10])
    path.write_bytes(payload)
    monkeypatch.setitem(data.CHECKSUMS["mnist"], path.name, hashlib.sha256(payload).hexdigest())
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("mnist", root=root)


def test_the_official_digests_are_registered():
    for name in ("mnist", "fashion-mnist"):
        assert len(data.CHECKSUMS[name]) == 4
    digests = [d for files in data.CHECKSUMS.values() for d in files.values()]
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in digests)


# -- CIFAR-10 binary ------------------------------------------------------------------


def cifar_records(rng, count):
    labels = rng.integers(0, 10, count).astype(np.uint8)
    pixels = rng.integers(0, 256, (count, 3072)).astype(np.uint8)
    return labels, pixels, np.concatenate([labels[:, None], pixels], axis=1).tobytes()


def test_cifar10_binary_archive_is_parsed(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    members, expected = {}, {}
    for name in data.CIFAR10_TRAIN_MEMBERS + data.CIFAR10_TEST_MEMBERS:
        labels, pixels, payload = cifar_records(rng, 2)
        members[name], expected[name] = payload, (labels, pixels)
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data.CHECKSUMS, "cifar10", {archive.name: digest})

    dataset = load_dataset("cifar10", root=tmp_path)
    assert dataset.train_images.shape == (10, 3, 32, 32)
    assert dataset.test_images.shape == (2, 3, 32, 32)
    labels, pixels = expected[data.CIFAR10_TEST_MEMBERS[0]]
    np.testing.assert_array_equal(dataset.test_labels, labels)
    # record layout: 1024 red, then 1024 green, then 1024 blue values, row-major
    np.testing.assert_allclose(
        dataset.test_images[1, 1].reshape(-1) * 255, pixels[1, 1024:2048], atol=1e-4
    )


def test_cifar_records_of_the_wrong_length_are_refused():
    with pytest.raises(DatasetError, match="truncated"):
        data.parse_cifar_records(bytes(3073 + 5), "batch.bin")


# -- the batch loader -------------------------------------------------------------------


def test_loader_order_depends_only_on_seed_and_epoch():
    images, labels = np.arange(10)[:, None].astype(np.float32), np.arange(10)
    loader = BatchLoader(images, labels, batch_size=4, seed=3)
    assert len(loader) == 3
    epoch0 = [batch_labels for _, batch_labels in loader.epoch(0)]
    again = [batch_labels for _, batch_labels in BatchLoader(images, labels, 4, seed=3).epoch(0)]
    for first, second in zip(epoch0, again, strict=True):
        np.testing.assert_array_equal(first, second)
    assert sorted(np.concatenate(epoch0)) == list(range(10))
    assert [len(batch) for batch in epoch0] == [4, 4, 2]
    epoch1 = np.concatenate([batch for _, batch in loader.epoch(1)])
    assert not np.array_equal(np.concatenate(epoch0), epoch1)
    # iterating the loader walks the epochs in turn
    walked = [np.concatenate([b for _, b in loader]) for _ in range(2)]
    np.testing.assert_array_equal(walked[0], np.concatenate(epoch0))
    np.testing.assert_array_equal(walked[1], epoch1)


def test_loader_without_shuffling_and_dropping_the_last_batch():
    images, labels = np.zeros((10, 1)), np.arange(10)
    loader = BatchLoader(images, labels, batch_size=4, shuffle=False, drop_last=True)
    assert len(loader) == 2
    np.testing.assert_array_equal(np.concatenate([b for _, b in loader.epoch(5)]), range(8))
    with pytest.raises(ValueError, match="labels"):
        BatchLoader(images, labels[:3], batch_size=4)
