"""Datasets for the experiments: real loaders without TensorFlow, and deterministic numpy batching.

Supported datasets: ``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn_cropped`` (real data) and
:func:`synthetic_dataset` (no files; for smoke tests).

How a real dataset gets into memory (:func:`load_dataset`):

1. A tensorflow-datasets builder of our own (``tscnc_mnist``, ``tscnc_fashion_mnist``,
   ``tscnc_cifar10``, ``tscnc_svhn_cropped``; registered with tfds the first time
   :func:`builder_class` runs) prepares ``array_record`` files in the tfds data directory from the
   dataset's *original distribution files*. TensorFlow is not needed: the features are
   ``tfds.features.Tensor`` and reading goes through ``builder.as_data_source()``. A prepared
   copy is reused; the original files are then no longer looked at (delete
   ``<data_dir>/tscnc_<name>`` to rebuild).
2. The original files come from the first of these that has them ("manual directory"):

   - the ``manual_dir`` argument (config key ``data.manual_dir``): the files themselves or a
     ``<name>/`` subdirectory with them. When given and the files are not there, that is an error;
   - ``$TSCNC_DATA_DIR/<name>/`` (one subdirectory per dataset: MNIST and Fashion-MNIST use the
     same file names, so a flat directory could silently give the wrong one);
   - for ``fashion_mnist`` only, the Debian/Ubuntu package ``dataset-fashion-mnist``
     (``/usr/share/datasets/fashion-mnist``; ``sudo apt-get install dataset-fashion-mnist``).

   Otherwise, when downloads are allowed (``allow_download=True`` and ``TSCNC_OFFLINE`` unset) and
   a 2-second connection probe reaches the download host (through the proxy of ``https_proxy`` /
   ``http_proxy`` when set), tfds' download manager fetches them from the official URLs and
   checks them against tfds' registered checksums where it has them (MNIST, Fashion-MNIST, SVHN).
   Otherwise :class:`DatasetNotFoundError` is raised at once (well under 5 s) naming the files,
   the places searched and the command that provides them. Nothing ever waits in tfds' retry loop.
3. The prepared splits are read into memory: images ``(N, H, W, C) uint8``, labels ``(N,) int32``.

Directories: prepared data goes to ``data_dir`` (config ``data.data_dir``), else
``$TSCNC_TFDS_DIR``, else tfds' default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
Downloads go to ``<data_dir>/downloads``.

Original file formats (all checked while reading):

- MNIST / Fashion-MNIST: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
  ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``: big-endian idx files, gzipped
  or not (decided by content, so Debian's re-gzipped copies and gunzipped files both work).
- CIFAR-10: ``cifar-10-python.tar.gz`` (or its extracted ``cifar-10-batches-py/``) with the
  Python pickles ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``; ``b"data"`` is
  ``N x 3072`` uint8, channel-major ``3 x 32 x 32``, converted here to ``32 x 32 x 3``. Pickles
  are read with an unpickler that only accepts what a numpy array needs, never arbitrary code.
- SVHN cropped: ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5; ``X`` is
  ``32 x 32 x 3 x N`` uint8, ``y`` is ``N x 1`` with 10 meaning the digit 0, mapped to 0 here).
  The ``extra`` split (1.3 GB) is not used.

Batching (:func:`iterate_batches`) is plain numpy and deterministic: the example order of an
epoch is a function of ``(seed, epoch)`` only, and augmentation of a batch (random crop from a
4-pixel zero padding, optional horizontal flip) a function of ``(seed, epoch, batch index)`` only,
so a resumed run continues at ``(epoch, batch)`` exactly with ``start_batch``. Flips are on by
default only for CIFAR-10 (``Dataset.horizontal_flip``): mirrored digits are not digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import io
import math
import os
import pathlib
import pickle
import socket
import struct
import sys
import tarfile
import threading
import time
import types
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DATASETS",
    "ENV_DATA_DIR",
    "ENV_MANUAL_DIR",
    "ENV_OFFLINE",
    "Dataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "builder_class",
    "can_connect",
    "epoch_permutation",
    "find_manual_files",
    "iterate_batches",
    "load_dataset",
    "load_for_config",
    "num_batches",
    "random_crop_flip",
    "read_cifar10",
    "read_idx",
    "read_svhn_mat",
    "synthetic_dataset",
    "train_val_split",
]

ENV_MANUAL_DIR = "TSCNC_DATA_DIR"
"""Root of the original files: ``$TSCNC_DATA_DIR/<dataset name>/`` holds one dataset's files."""
ENV_DATA_DIR = "TSCNC_TFDS_DIR"
"""Where prepared (array_record) data goes when ``data_dir`` is not given."""
ENV_OFFLINE = "TSCNC_OFFLINE"
"""Set to ``1`` to forbid downloads (same as ``allow_download=False``)."""

DEBIAN_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
PROBE_TIMEOUT = 2.0  # seconds; the whole offline failure stays well under 5 s

# Distinct first words of the seed sequences, so the streams never coincide.
_SHUFFLE_STREAM = 0x5348
_AUGMENT_STREAM = 0x4155
_SPLIT_STREAM = 0x5350
_SYNTHETIC_STREAM = 0x5359


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not prepared, its original files are not found and they cannot be downloaded.

    The message names the files needed, every place searched and the command that fixes it.
    """


# ----------------------------------------------------------------------------------------------
# Original file formats.
# ----------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``, gunzipped when the content is gzip (whatever the file name)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e}).") from e
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file (the MNIST format), gzipped or not, into a native-endian array.

    Format: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions ``d``, ``d``
    big-endian uint32 sizes, then the values in C order (multi-byte values big-endian).
    """
    raw = _read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (header {raw[:4]!r}).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"{path}: truncated idx header.")
    shape = struct.unpack(f">{ndim}I", raw[4:offset])
    count = math.prod(shape)
    if len(raw) != offset + count * dtype.itemsize:
        raise ValueError(f"{path}: idx header says shape {shape} ({count * dtype.itemsize} bytes) "
                         f"but the file has {len(raw) - offset} data bytes.")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches: dicts, lists, bytes and numpy arrays only, no other code."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR pickle.")
        if module.startswith("numpy.core."):  # files pickled by numpy 1.x; numpy 2 renamed it
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    d = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a dict, got {type(d).__name__}.")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{where}: keys {sorted(d)} lack 'data' / 'labels'.")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{where}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072).")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{where}: {labels.shape[0]} labels for {data.shape[0]} images.")
    # Each row is the red plane, then green, then blue, each 32 x 32 row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar10(source: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads CIFAR-10 (python version) into ``{"train": (images, labels), "test": (...)}``.

    ``source``: ``cifar-10-python.tar.gz`` (any tar compression), or a directory holding the
    batch files directly or in ``cifar-10-batches-py/``. Images ``(N, 32, 32, 3) uint8``, labels
    ``(N,) int64``; the order is the files' order (batches 1 to 5, then the test batch).
    """
    source = pathlib.Path(source)
    names = _CIFAR_TRAIN + _CIFAR_TEST
    raws: dict[str, bytes] = {}
    if source.is_dir():
        base = source / _CIFAR_DIR if (source / _CIFAR_DIR).is_dir() else source
        for name in names:
            raws[name] = (base / name).read_bytes()
    else:
        with tarfile.open(source, "r:*") as tar:
            members = {pathlib.PurePosixPath(m.name).name: m for m in tar.getmembers()
                       if m.isfile()}
            for name in names:
                if name not in members:
                    raise ValueError(f"{source}: no {_CIFAR_DIR}/{name} in the archive.")
                f = tar.extractfile(members[name])
                assert f is not None
                raws[name] = f.read()
    out = {}
    for split, batch_names in (("train", _CIFAR_TRAIN), ("test", _CIFAR_TEST)):
        parts = [_cifar_batch(raws[n], f"{source}:{n}") for n in batch_names]
        out[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return out


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads an SVHN cropped-digits ``.mat`` file: images ``(N, 32, 32, 3) uint8``, labels 0-9."""
    import scipy.io

    mat = scipy.io.loadmat(os.fspath(path), variable_names=("X", "y"))
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: no 'X' / 'y' variables (found {sorted(mat)}).")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.shape[0]:
        raise ValueError(f"{path}: X has shape {x.shape} and y {y.shape}; expected "
                         f"(32, 32, 3, N) and (N, 1).")
    if x.dtype != np.uint8:
        raise ValueError(f"{path}: X is {x.dtype}, expected uint8.")
    labels = y.astype(np.int64)
    if not np.array_equal(labels, y) or labels.min(initial=1) < 1 or labels.max(initial=1) > 10:
        raise ValueError(f"{path}: labels must be integers 1..10 (10 is the digit 0).")
    labels[labels == 10] = 0
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels


def _read_idx_dataset(files: Mapping[str, pathlib.Path]) -> dict[str, tuple[np.ndarray, ...]]:
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(files[f"{prefix}-images-idx3-ubyte.gz"])
        labels = read_idx(files[f"{prefix}-labels-idx1-ubyte.gz"])
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{split} images are {images.dtype} {images.shape}; "
                             f"expected uint8 (N, 28, 28).")
        if labels.shape != images.shape[:1] or labels.max(initial=0) > 9:
            raise ValueError(f"{split}: {labels.shape} labels (max {labels.max(initial=0)}) for "
                             f"{images.shape[0]} images; expected one label 0-9 per image.")
        out[split] = (images[..., None], labels.astype(np.int64))
    return out


def _read_cifar_dataset(files: Mapping[str, pathlib.Path]) -> dict[str, tuple[np.ndarray, ...]]:
    return read_cifar10(files["cifar-10-python.tar.gz"])


def _read_svhn_dataset(files: Mapping[str, pathlib.Path]) -> dict[str, tuple[np.ndarray, ...]]:
    return {"train": read_svhn_mat(files["train_32x32.mat"]),
            "test": read_svhn_mat(files["test_32x32.mat"])}


# ----------------------------------------------------------------------------------------------
# Where the original files are.
# ----------------------------------------------------------------------------------------------


def _locate_idx(directory: pathlib.Path, files: Sequence[str]) -> dict[str, pathlib.Path]:
    found = {}
    for name in files:  # "x.gz", or the gunzipped "x"
        for candidate in (directory / name, directory / name.removesuffix(".gz")):
            if candidate.is_file():
                found[name] = candidate
                break
    return found


def _locate_plain(directory: pathlib.Path, files: Sequence[str]) -> dict[str, pathlib.Path]:
    return {name: directory / name for name in files if (directory / name).is_file()}


def _locate_cifar(directory: pathlib.Path, files: Sequence[str]) -> dict[str, pathlib.Path]:
    (name,) = files
    if (directory / name).is_file():
        return {name: directory / name}
    for base in (directory / _CIFAR_DIR, directory):  # the extracted archive
        if all((base / n).is_file() for n in _CIFAR_TRAIN + _CIFAR_TEST):
            return {name: base}
    return {}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What we know about one real dataset."""

    name: str
    title: str
    image_shape: tuple[int, int, int]
    num_classes: int
    num_train: int
    num_test: int
    files: tuple[str, ...]  # the original distribution files
    base_url: str  # download URL of each file: base_url + file name
    homepage: str
    horizontal_flip: bool  # whether a mirrored image keeps its label (default augmentation)
    locate: Callable[[pathlib.Path, Sequence[str]], dict[str, pathlib.Path]]
    read: Callable[[Mapping[str, pathlib.Path]], dict[str, tuple[np.ndarray, ...]]]
    debian_dir: pathlib.Path | None = None
    debian_package: str | None = None
    alternatives: str = ""  # accepted instead of the files, for messages

    @property
    def builder_name(self) -> str:
        return f"tscnc_{self.name}"

    @property
    def urls(self) -> dict[str, str]:
        return {f: self.base_url + f for f in self.files}


_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            name="mnist", title="MNIST", image_shape=(28, 28, 1), num_classes=10,
            num_train=60_000, num_test=10_000, files=_IDX_FILES,
            base_url="https://storage.googleapis.com/cvdf-datasets/mnist/",
            homepage="http://yann.lecun.com/exdb/mnist/", horizontal_flip=False,
            locate=_locate_idx, read=_read_idx_dataset,
            alternatives="each may also be gunzipped and named without .gz"),
        DatasetSpec(
            name="fashion_mnist", title="Fashion-MNIST", image_shape=(28, 28, 1), num_classes=10,
            num_train=60_000, num_test=10_000, files=_IDX_FILES,
            base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            homepage="https://github.com/zalandoresearch/fashion-mnist", horizontal_flip=False,
            locate=_locate_idx, read=_read_idx_dataset,
            debian_dir=DEBIAN_FASHION_MNIST_DIR, debian_package="dataset-fashion-mnist",
            alternatives="each may also be gunzipped and named without .gz"),
        DatasetSpec(
            name="cifar10", title="CIFAR-10", image_shape=(32, 32, 3), num_classes=10,
            num_train=50_000, num_test=10_000, files=("cifar-10-python.tar.gz",),
            base_url="https://www.cs.toronto.edu/~kriz/",
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html", horizontal_flip=True,
            locate=_locate_cifar, read=_read_cifar_dataset,
            alternatives=f"or instead the extracted {_CIFAR_DIR}/ directory"),
        DatasetSpec(
            name="svhn_cropped", title="SVHN (cropped digits)", image_shape=(32, 32, 3),
            num_classes=10, num_train=73_257, num_test=26_032,
            files=("train_32x32.mat", "test_32x32.mat"),
            base_url="http://ufldl.stanford.edu/housenumbers/",
            homepage="http://ufldl.stanford.edu/housenumbers/", horizontal_flip=False,
            locate=_locate_plain, read=_read_svhn_dataset),
    )
}


def _spec(name: str) -> DatasetSpec:
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)} "
                         f"(and 'synthetic' through synthetic_dataset / load_for_config).")
    return DATASETS[key]


def _search_path(spec: DatasetSpec,
                 manual_dir: str | os.PathLike | None) -> list[tuple[str, pathlib.Path | None]]:
    """``(description, directory or None when unset)`` in the order they are tried."""
    places: list[tuple[str, pathlib.Path | None]] = []
    if manual_dir is not None:
        d = pathlib.Path(manual_dir).expanduser()
        places += [("manual_dir (config data.manual_dir)", d),
                   ("manual_dir (config data.manual_dir)", d / spec.name)]
    root = os.environ.get(ENV_MANUAL_DIR)
    places.append((f"${ENV_MANUAL_DIR}/{spec.name}",
                   pathlib.Path(root).expanduser() / spec.name if root else None))
    if spec.debian_dir is not None:
        places.append((f"Debian package {spec.debian_package}", spec.debian_dir))
    return places


def find_manual_files(name: str, manual_dir: str | os.PathLike | None = None
                      ) -> tuple[pathlib.Path, dict[str, pathlib.Path]] | None:
    """The first directory of the search path holding all of ``name``'s original files.

    Returns ``(directory, {file name: path})`` or None. Raises :class:`DatasetNotFoundError`
    when ``manual_dir`` is given but neither it nor ``manual_dir/<name>`` has the files.
    """
    spec = _spec(name)
    places = _search_path(spec, manual_dir)
    for _, directory in places:
        if directory is not None and directory.is_dir():
            found = spec.locate(directory, spec.files)
            if len(found) == len(spec.files):
                return directory, found
    if manual_dir is not None:
        raise DatasetNotFoundError(_not_found_message(
            spec, places[:2], f"manual_dir={os.fspath(manual_dir)!r} was given explicitly, so "
                              f"nothing else was tried."))
    return None


# ----------------------------------------------------------------------------------------------
# Fail fast when offline.
# ----------------------------------------------------------------------------------------------


def _probe_target(url: str) -> tuple[str, int]:
    """``(host, port)`` a download of ``url`` connects to first: the proxy's when one applies."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def can_connect(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to ``url``'s host (or proxy) opens within ``timeout`` seconds.

    Name resolution is bounded too: the attempt runs in a daemon thread that is abandoned at the
    deadline.
    """
    host, port = _probe_target(url)
    ok = threading.Event()

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    thread = threading.Thread(target=attempt, name="tscnc-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return ok.is_set()


def _downloads_allowed(allow_download: bool) -> bool:
    return allow_download and os.environ.get(ENV_OFFLINE, "").lower() not in (
        "1", "true", "yes", "on")


def _not_found_message(spec: DatasetSpec, places: Sequence[tuple[str, pathlib.Path | None]],
                       reason: str) -> str:
    lines = [f"{spec.title} ({spec.name!r}) is not prepared and its original files were not "
             f"found. {reason}",
             "Files needed:", *(f"  {f}" for f in spec.files)]
    if spec.alternatives:
        lines.append(f"  ({spec.alternatives})")
    lines.append("Looked in:")
    for description, directory in places:
        if directory is None:
            lines.append(f"  {description}: not set")
            continue
        state = "missing"
        if directory.is_dir():
            found = spec.locate(directory, spec.files)
            missing = [f for f in spec.files if f not in found]
            state = "lacks " + ", ".join(missing)
        lines.append(f"  {description}: {directory} ({state})")
    lines.append("To fix:")
    if spec.debian_package:
        lines.append(f"  sudo apt-get install {spec.debian_package}   (Debian/Ubuntu; found "
                     f"automatically in {spec.debian_dir})")
        lines.append("  or download the files:")
    lines.append(f"  mkdir -p DIR/{spec.name} && cd DIR/{spec.name} && "
                 + " && ".join(f"curl -fLO {u}" for u in spec.urls.values()))
    lines.append(f"  then set {ENV_MANUAL_DIR}=DIR (or pass --config.data.manual_dir="
                 f"DIR/{spec.name}); or run where {spec.base_url} is reachable with downloads "
                 f"allowed (data.allow_download=True, {ENV_OFFLINE} unset) and they are fetched "
                 f"automatically.")
    return "\n".join(lines)


def _check_can_download(spec: DatasetSpec, places, *, allow_download: bool,
                        probe: Callable[[str], bool]) -> None:
    if not _downloads_allowed(allow_download):
        why = ("Downloads are disabled (allow_download=False)." if not allow_download
               else f"Downloads are disabled (${ENV_OFFLINE} is set).")
        raise DatasetNotFoundError(_not_found_message(spec, places, why))
    url = next(iter(spec.urls.values()))
    if not probe(url):
        host, port = _probe_target(url)
        raise DatasetNotFoundError(_not_found_message(
            spec, places, f"No network: {host}:{port} did not answer within "
                          f"{PROBE_TIMEOUT:g} s, so nothing was downloaded."))


# ----------------------------------------------------------------------------------------------
# tfds builders.
# ----------------------------------------------------------------------------------------------


def _manual_instructions(spec: DatasetSpec) -> str:
    text = f"Put {', '.join(spec.files)} in the manual directory; they are at {spec.base_url}."
    if spec.alternatives:
        text += f" ({spec.alternatives[0].upper()}{spec.alternatives[1:]}.)"
    if spec.debian_package:
        text += (f" On Debian/Ubuntu, `sudo apt-get install {spec.debian_package}` installs them "
                 f"in {spec.debian_dir}.")
    return text


@functools.cache
def _builder_classes() -> dict[str, type]:
    import tensorflow_datasets as tfds

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Prepares one :class:`DatasetSpec` from its original files (manual dir or download)."""

        SPEC: DatasetSpec
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "First version, from the original distribution files."}

        def __init__(self, **kwargs: Any):
            if kwargs.get("file_format") is None:
                kwargs["file_format"] = "array_record"
            super().__init__(**kwargs)

        def _info(self):
            spec = self.SPEC
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{spec.title}, prepared by tscnc_jax from the original files.",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=spec.image_shape, dtype=np.uint8),
                    "label": tfds.features.Tensor(shape=(), dtype=np.int64),
                }),
                supervised_keys=("image", "label"),
                homepage=spec.homepage,
                disable_shuffling=True,  # keep the original example order
            )

        def _split_generators(self, dl_manager):
            spec = self.SPEC
            files = None
            try:
                manual = pathlib.Path(dl_manager.manual_dir)
            except AssertionError:  # tfds: manual dir missing or empty
                manual = None
            if manual is not None:
                found = spec.locate(manual, spec.files)
                files = found if len(found) == len(spec.files) else None
            if files is None:
                # Direct tfds users get the fast failure too, never tfds' retry loop.
                places = [("manual directory", manual)]
                _check_can_download(spec, places, allow_download=True, probe=can_connect)
                files = {k: pathlib.Path(v) for k, v in dl_manager.download(spec.urls).items()}
            arrays = spec.read(files)
            for split, (images, labels) in arrays.items():
                if images.shape[1:] != spec.image_shape:
                    raise ValueError(f"{spec.name} {split}: images {images.shape[1:]}, expected "
                                     f"{spec.image_shape}.")
                if len(labels) and not 0 <= labels.min() <= labels.max() < spec.num_classes:
                    raise ValueError(f"{spec.name} {split}: labels outside [0, "
                                     f"{spec.num_classes}).")
            return {split: self._generate_examples(images, labels)
                    for split, (images, labels) in arrays.items()}

        def _generate_examples(self, images, labels):
            for i in range(len(labels)):
                yield i, {"image": images[i], "label": int(labels[i])}

    classes = {}
    for spec in DATASETS.values():
        attrs = {"name": spec.builder_name, "SPEC": spec,
                 "MANUAL_DOWNLOAD_INSTRUCTIONS": _manual_instructions(spec),
                 "__module__": __name__, "__qualname__": spec.builder_name,
                 "__doc__": f"{spec.title} from its original files (see experiments.data)."}

        def body(ns: dict, attrs: dict = attrs) -> None:
            ns.update(attrs)

        try:
            cls = types.new_class(spec.builder_name, (_Builder,), exec_body=body)
        except ValueError:  # already registered (this module was reloaded)
            cls = types.new_class(spec.builder_name, (_Builder,), {"skip_registration": True},
                                  body)
        classes[spec.name] = cls
    return classes


def builder_class(name: str) -> type:
    """The tfds builder class of dataset ``name`` (registered as ``tscnc_<name>`` on first use)."""
    return _builder_classes()[_spec(name).name]


# ----------------------------------------------------------------------------------------------
# In-memory datasets.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset in memory. Images ``(N, H, W, C) uint8``, labels ``(N,) int32``.

    ``val_*`` are empty until :func:`train_val_split` carves a validation set out of the training
    data (model selection must never look at the test set). ``horizontal_flip`` says whether a
    mirrored image keeps its label, i.e. whether augmentation should flip (CIFAR-10 only).
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None
    horizontal_flip: bool = False

    def __post_init__(self):
        if self.val_images is None:  # an empty validation split of the right shape
            object.__setattr__(self, "val_images", self.train_images[:0])
            object.__setattr__(self, "val_labels", self.train_labels[:0])
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if x.dtype != np.uint8 or x.ndim != 4 or y.shape != x.shape[:1]:
                raise ValueError(f"{split}: images {x.dtype} {x.shape} and labels {y.shape}; "
                                 f"expected uint8 (N, H, W, C) and (N,).")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.train_labels)}, "
                f"val={len(self.val_labels)}, test={len(self.test_labels)}, "
                f"image_shape={self.image_shape}, num_classes={self.num_classes})")


def _tfds_data_dir(data_dir: str | os.PathLike | None) -> str | None:
    if data_dir is not None:
        return os.fspath(pathlib.Path(data_dir).expanduser())
    env = os.environ.get(ENV_DATA_DIR)
    return os.fspath(pathlib.Path(env).expanduser()) if env else None


def _read_split(source, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    n = len(source)
    images, labels = None, None
    for start in range(0, n, chunk):
        examples = source.__getitems__(list(range(start, min(n, start + chunk))))
        if images is None:
            first = np.asarray(examples[0]["image"])
            images = np.empty((n, *first.shape), np.uint8)
            labels = np.empty((n,), np.int32)
        images[start:start + len(examples)] = np.stack([e["image"] for e in examples])
        labels[start:start + len(examples)] = [e["label"] for e in examples]
    if images is None:
        raise ValueError("empty split")
    return images, labels


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None,
                 manual_dir: str | os.PathLike | None = None, allow_download: bool = True,
                 probe: Callable[[str], bool] | None = None) -> Dataset:
    """Loads a real dataset into memory, preparing it first if needed (see the module docstring).

    Args:
      name: ``mnist``, ``fashion_mnist``, ``cifar10`` or ``svhn_cropped``.
      data_dir: tfds data directory for the prepared files (default ``$TSCNC_TFDS_DIR``, else
        tfds' default).
      manual_dir: directory with the original files (or with a ``<name>/`` subdirectory).
      allow_download: allow tfds' download manager to fetch missing files (also needs
        ``TSCNC_OFFLINE`` unset and the host to answer the connection probe).
      probe: ``url -> bool`` connectivity check used before downloading (default
        :func:`can_connect`, 2-second timeout); tests pass a fake.

    Raises:
      DatasetNotFoundError: not prepared, files not found and no download possible; raised
        within a few seconds with the files needed and the command that provides them.
    """
    import tensorflow_datasets as tfds

    spec = _spec(name)
    builder = builder_class(spec.name)(data_dir=_tfds_data_dir(data_dir))
    # (is_prepared alone logs a misleading warning about a folder that does not exist yet.)
    if not ((builder.data_path / "dataset_info.json").exists() and builder.is_prepared()):
        located = find_manual_files(spec.name, manual_dir)
        if located is None:
            _check_can_download(spec, _search_path(spec, manual_dir),
                                allow_download=allow_download, probe=probe or can_connect)
        config = tfds.download.DownloadConfig(
            manual_dir=os.fspath(located[0]) if located else None, try_download_gcs=False)
        builder.download_and_prepare(download_config=config)
    sources = builder.as_data_source()
    train_images, train_labels = _read_split(sources["train"])
    test_images, test_labels = _read_split(sources["test"])
    return Dataset(name=spec.name, train_images=train_images, train_labels=train_labels,
                   test_images=test_images, test_labels=test_labels,
                   num_classes=spec.num_classes, horizontal_flip=spec.horizontal_flip)


def train_val_split(ds: Dataset, num_val: int, seed: int = 0) -> Dataset:
    """Moves ``num_val`` random training examples (chosen from ``seed``) to the validation split.

    The test split is untouched. The remaining training examples keep their original order.
    """
    n = len(ds.train_labels)
    if not 0 <= num_val < n:
        raise ValueError(f"num_val={num_val} must be in [0, {n}) for {n} training examples.")
    perm = np.random.default_rng([_SPLIT_STREAM, _seed(seed)]).permutation(n)
    val_idx, train_idx = np.sort(perm[:num_val]), np.sort(perm[num_val:])
    return dataclasses.replace(
        ds, train_images=ds.train_images[train_idx], train_labels=ds.train_labels[train_idx],
        val_images=ds.train_images[val_idx], val_labels=ds.train_labels[val_idx])


def synthetic_dataset(name_or_shape: str | Sequence[int] = "fashion_mnist", num_train: int = 512,
                      num_test: int = 256, seed: int = 0, num_classes: int = 10) -> Dataset:
    """A file-free dataset with the shapes of a real one and a learnable signal (smoke tests).

    Each class has a fixed random template; an image is the mean of its class template and
    uniform noise, quantised to uint8, so a linear model separates the classes well.
    """
    if isinstance(name_or_shape, str):
        spec = _spec(name_or_shape)
        shape, label = spec.image_shape, f"synthetic_{spec.name}"
    else:
        shape = tuple(int(s) for s in name_or_shape)
        if len(shape) != 3:
            raise ValueError(f"shape {shape} must be (H, W, C).")
        label = "synthetic"
    rng = np.random.default_rng([_SYNTHETIC_STREAM, _seed(seed)])
    templates = rng.random((num_classes, *shape))

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, n)
        x = 0.5 * templates[labels] + 0.5 * rng.random((n, *shape))
        return np.round(x * 255).astype(np.uint8), labels.astype(np.int32)

    train, test = make(num_train), make(num_test)
    return Dataset(name=label, train_images=train[0], train_labels=train[1],
                   test_images=test[0], test_labels=test[1], num_classes=num_classes)


def load_for_config(config) -> Dataset:
    """The dataset of an experiment config, with its validation split carved out.

    Reads ``config.dataset`` (a name of :data:`DATASETS` or ``"synthetic"``),
    ``config.num_classes``, ``config.seed`` and ``config.data.{manual_dir, data_dir,
    allow_download, num_val, num_train, synthetic_shape, synthetic_train, synthetic_test}``
    (``num_train > 0`` keeps a fixed random subset of the training split). The validation
    split is drawn with ``config.data.split_seed`` (0 in the base config, and for the configs
    of runs kept from before the key existed): it does not change with the training seed, so
    runs with different seeds train and select on the same examples.
    """
    d = config.data
    if config.dataset == "synthetic":
        ds = synthetic_dataset(tuple(d.synthetic_shape), d.synthetic_train, d.synthetic_test,
                               seed=config.seed, num_classes=config.num_classes)
    else:
        ds = load_dataset(config.dataset, data_dir=d.data_dir, manual_dir=d.manual_dir,
                          allow_download=d.allow_download)
        if ds.num_classes != config.num_classes:
            raise ValueError(f"config.num_classes={config.num_classes} but {ds.name} has "
                             f"{ds.num_classes} classes.")
    ds = train_val_split(ds, d.num_val, seed=d.get("split_seed", 0))
    num_train = int(d.get("num_train", 0) or 0)
    if num_train < 0:
        raise ValueError(f"config.data.num_train must be >= 0 (0: all), got {num_train}.")
    if 0 < num_train < len(ds.train_labels):
        # A subset drawn with the split's seed: the same examples for every training seed.
        keep = np.sort(np.random.default_rng([_SPLIT_STREAM, 1, _seed(d.get("split_seed", 0))])
                       .permutation(len(ds.train_labels))[:num_train])
        ds = dataclasses.replace(ds, train_images=ds.train_images[keep],
                                 train_labels=ds.train_labels[keep])
    return ds


# ----------------------------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------------------------


def _seed(seed: int) -> int:
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    return seed


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of an epoch: a permutation of ``range(n)`` fixed by (seed, epoch)."""
    return np.random.default_rng([_SHUFFLE_STREAM, _seed(seed), _seed(epoch)]).permutation(n)


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches per epoch of ``n`` examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, *, padding: int = 4,
                     flip: bool = True) -> np.ndarray:
    """Random ``H x W`` crops of the zero-padded images, each mirrored with probability 1/2.

    ``images``: ``(B, H, W, C)``, any dtype (returned in the same dtype). One offset pair per
    image, uniform in ``[0, 2 * padding]``; ``flip=False`` skips mirroring.
    """
    b, h, w, _ = images.shape
    p = int(padding)
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    dy = rng.integers(0, 2 * p + 1, b)
    dx = rng.integers(0, 2 * p + 1, b)
    cols = np.arange(w)
    if flip:
        mirrored = rng.random(b) < 0.5
        cols = np.where(mirrored[:, None], cols[::-1], cols)
    else:
        cols = np.broadcast_to(cols, (b, w))
    rows = dy[:, None] + np.arange(h)  # (B, H)
    cols = dx[:, None] + cols  # (B, W)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def iterate_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int = 0,
                    epoch: int = 0, shuffle: bool = True, augment: bool = False,
                    flip: bool = True, padding: int = 4, drop_remainder: bool = True,
                    start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{"image": float32 NHWC in [0, 1], "label": int32}`` batches of one epoch.

    The order is :func:`epoch_permutation` ``(n, seed, epoch)`` (``shuffle=False``: the stored
    order), so every example appears exactly once per epoch. With ``augment``, batch ``i`` is
    cropped (``padding``) and, if ``flip``, mirrored by :func:`random_crop_flip` with a generator
    seeded from ``(seed, epoch, i)``. Batches before ``start_batch`` are skipped without being
    computed, and the rest are identical to an uninterrupted epoch: resume at (epoch, batch).
    ``drop_remainder=False`` yields a final smaller batch. Pass ``flip=dataset.horizontal_flip``
    to follow the dataset's default (only CIFAR-10 flips).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}.")
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels {labels.shape} do not match {n} images.")
    total = num_batches(n, batch_size, drop_remainder)
    if not 0 <= start_batch <= total:
        raise ValueError(f"start_batch={start_batch} not in [0, {total}].")
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    for i in range(start_batch, total):
        idx = order[i * batch_size:(i + 1) * batch_size]
        x = images[idx]
        if augment:
            rng = np.random.default_rng([_AUGMENT_STREAM, _seed(seed), _seed(epoch), i])
            x = random_crop_flip(x, rng, padding=padding, flip=flip)
        yield {"image": x.astype(np.float32) / 255.0, "label": labels[idx].astype(np.int32)}


# ----------------------------------------------------------------------------------------------
# Command line: prepare a dataset once (``python -m experiments.data fashion_mnist``).
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare and load a dataset; print its shapes.")
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--manual_dir", default=None)
    parser.add_argument("--no_download", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        ds = load_dataset(args.name, data_dir=args.data_dir, manual_dir=args.manual_dir,
                          allow_download=not args.no_download)
    except DatasetNotFoundError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{ds} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
