"""Where a dataset's original files come from: the dataset specs, the places searched for the files
(``manual_dir``, ``$TSCNC_DATA_DIR``, the Debian package), the network probe, whether downloads
are allowed, and the :class:`DatasetNotFoundError` messages that say what to do instead.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments.data.readers import (
    CIFAR_DIR,
    locate_cifar,
    locate_idx,
    locate_plain,
    read_cifar_dataset,
    read_idx_dataset,
    read_svhn_dataset,
)

ENV_MANUAL_DIR = "TSCNC_DATA_DIR"
"""Root of the original files: ``$TSCNC_DATA_DIR/<dataset name>/`` holds one dataset's files."""
ENV_DATA_DIR = "TSCNC_TFDS_DIR"
"""Where prepared (array_record) data goes when ``data_dir`` is not given."""
ENV_OFFLINE = "TSCNC_OFFLINE"
"""Set to ``1`` to forbid downloads (same as ``allow_download=False``)."""

DEBIAN_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
PROBE_TIMEOUT = 2.0  # seconds; the whole offline failure stays well under 5 s


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not prepared, its original files are not found and they cannot be downloaded.

    The message names the files needed, every place searched and the command that fixes it.
    """


# ----------------------------------------------------------------------------------------------
# The datasets.
# ----------------------------------------------------------------------------------------------


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


def _idx_spec(**kwargs: Any) -> DatasetSpec:
    """A data set in MNIST's format: 60,000 + 10,000 28x28 grey images of 10 classes in the four
    IDX files, trained without mirroring."""
    return DatasetSpec(image_shape=(28, 28, 1), num_classes=10, num_train=60_000,
                       num_test=10_000, files=_IDX_FILES, horizontal_flip=False,
                       locate=locate_idx, read=read_idx_dataset,
                       alternatives="each may also be gunzipped and named without .gz", **kwargs)


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        _idx_spec(
            name="mnist", title="MNIST",
            base_url="https://storage.googleapis.com/cvdf-datasets/mnist/",
            homepage="http://yann.lecun.com/exdb/mnist/"),
        _idx_spec(
            name="fashion_mnist", title="Fashion-MNIST",
            base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            debian_dir=DEBIAN_FASHION_MNIST_DIR, debian_package="dataset-fashion-mnist"),
        DatasetSpec(
            name="cifar10", title="CIFAR-10", image_shape=(32, 32, 3), num_classes=10,
            num_train=50_000, num_test=10_000, files=("cifar-10-python.tar.gz",),
            base_url="https://www.cs.toronto.edu/~kriz/",
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html", horizontal_flip=True,
            locate=locate_cifar, read=read_cifar_dataset,
            alternatives=f"or instead the extracted {CIFAR_DIR}/ directory"),
        DatasetSpec(
            name="svhn_cropped", title="SVHN (cropped digits)", image_shape=(32, 32, 3),
            num_classes=10, num_train=73_257, num_test=26_032,
            files=("train_32x32.mat", "test_32x32.mat"),
            base_url="http://ufldl.stanford.edu/housenumbers/",
            homepage="http://ufldl.stanford.edu/housenumbers/", horizontal_flip=False,
            locate=locate_plain, read=read_svhn_dataset),
    )
}


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` (case-insensitive, ``-`` read as ``_``)."""
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)} "
                         f"(and 'synthetic' through synthetic_dataset / load_for_config).")
    return DATASETS[key]


# ----------------------------------------------------------------------------------------------
# Where the original files are.
# ----------------------------------------------------------------------------------------------


def search_path(spec: DatasetSpec,
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
    spec = get_spec(name)
    places = search_path(spec, manual_dir)
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


def check_can_download(spec: DatasetSpec, places: Sequence[tuple[str, pathlib.Path | None]], *,
                       allow_download: bool, probe: Callable[[str], bool] | None = None) -> None:
    """Raises :class:`DatasetNotFoundError` at once unless ``spec``'s files can be downloaded.

    Downloads need ``allow_download``, ``$TSCNC_OFFLINE`` unset and ``probe`` (default
    :func:`can_connect`) to reach the first file's host; ``places`` are the directories searched,
    for the message.
    """
    if not _downloads_allowed(allow_download):
        why = ("Downloads are disabled (allow_download=False)." if not allow_download
               else f"Downloads are disabled (${ENV_OFFLINE} is set).")
        raise DatasetNotFoundError(_not_found_message(spec, places, why))
    url = next(iter(spec.urls.values()))
    if not (probe or can_connect)(url):
        host, port = _probe_target(url)
        raise DatasetNotFoundError(_not_found_message(
            spec, places, f"No network: {host}:{port} did not answer within "
                          f"{PROBE_TIMEOUT:g} s, so nothing was downloaded."))
