"""The datasets' original file formats, read without TensorFlow and checked while reading.

Each reader returns ``{"train": (images, labels), "test": (...)}`` with images
``(N, H, W, C) uint8`` and labels ``(N,) int64`` (:func:`read_idx_dataset`,
:func:`read_cifar_dataset`, :func:`read_svhn_dataset`); each locator (:func:`locate_idx`,
:func:`locate_cifar`, :func:`locate_plain`) finds a dataset's files in one directory. The formats
are described in :mod:`experiments.data`.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pathlib
import pickle
import struct
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

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


CIFAR_DIR = "cifar-10-batches-py"
"""The directory of the batch files inside ``cifar-10-python.tar.gz``."""
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
        base = source / CIFAR_DIR if (source / CIFAR_DIR).is_dir() else source
        for name in names:
            raws[name] = (base / name).read_bytes()
    else:
        with tarfile.open(source, "r:*") as tar:
            members = {pathlib.PurePosixPath(m.name).name: m for m in tar.getmembers()
                       if m.isfile()}
            for name in names:
                if name not in members:
                    raise ValueError(f"{source}: no {CIFAR_DIR}/{name} in the archive.")
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


# ----------------------------------------------------------------------------------------------
# Per-dataset readers: {original file name: path} -> {"train": ..., "test": ...}.
# ----------------------------------------------------------------------------------------------


def read_idx_dataset(files: Mapping[str, pathlib.Path]) -> dict[str, tuple[np.ndarray, ...]]:
    """MNIST / Fashion-MNIST from the four idx files: images ``(N, 28, 28, 1)``, labels 0-9."""
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


def read_cifar_dataset(files: Mapping[str, pathlib.Path]) -> dict[str, tuple[np.ndarray, ...]]:
    """CIFAR-10 from ``cifar-10-python.tar.gz`` (or the extracted directory in its place)."""
    return read_cifar10(files["cifar-10-python.tar.gz"])


def read_svhn_dataset(files: Mapping[str, pathlib.Path]) -> dict[str, tuple[np.ndarray, ...]]:
    """SVHN cropped digits from ``train_32x32.mat`` and ``test_32x32.mat``."""
    return {"train": read_svhn_mat(files["train_32x32.mat"]),
            "test": read_svhn_mat(files["test_32x32.mat"])}


# ----------------------------------------------------------------------------------------------
# Per-dataset locators: (directory, original file names) -> {file name: path} of those found.
# ----------------------------------------------------------------------------------------------


def locate_idx(directory: pathlib.Path, files: Sequence[str]) -> dict[str, pathlib.Path]:
    """The idx files in ``directory``, each as ``x.gz`` or gunzipped as ``x``."""
    found = {}
    for name in files:  # "x.gz", or the gunzipped "x"
        for candidate in (directory / name, directory / name.removesuffix(".gz")):
            if candidate.is_file():
                found[name] = candidate
                break
    return found


def locate_plain(directory: pathlib.Path, files: Sequence[str]) -> dict[str, pathlib.Path]:
    """The files in ``directory`` under their own names."""
    return {name: directory / name for name in files if (directory / name).is_file()}


def locate_cifar(directory: pathlib.Path, files: Sequence[str]) -> dict[str, pathlib.Path]:
    """The CIFAR-10 archive in ``directory``, or else the directory of its extracted batches."""
    (name,) = files
    if (directory / name).is_file():
        return {name: directory / name}
    for base in (directory / CIFAR_DIR, directory):  # the extracted archive
        if all((base / n).is_file() for n in _CIFAR_TRAIN + _CIFAR_TEST):
            return {name: base}
    return {}
