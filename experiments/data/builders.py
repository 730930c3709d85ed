"""The tfds builders of the real datasets and the in-memory :class:`Dataset`: loading, the
validation split, synthetic data, and the dataset of an experiment config.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from experiments.data.pipeline import SPLIT_STREAM, SYNTHETIC_STREAM, check_seed
from experiments.data.sources import (
    DATASETS,
    ENV_DATA_DIR,
    DatasetSpec,
    check_can_download,
    find_manual_files,
    get_spec,
    search_path,
)

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
                check_can_download(spec, places, allow_download=True)
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
    return _builder_classes()[get_spec(name).name]


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
    """Loads a real dataset into memory, preparing it first if needed (see :mod:`experiments.data`).

    Args:
      name: ``mnist``, ``fashion_mnist``, ``cifar10`` or ``svhn_cropped``.
      data_dir: tfds data directory for the prepared files (default ``$TSCNC_TFDS_DIR``, else
        tfds' default).
      manual_dir: directory with the original files (or with a ``<name>/`` subdirectory).
      allow_download: allow tfds' download manager to fetch missing files (also needs
        ``TSCNC_OFFLINE`` unset and the host to answer the connection probe).
      probe: ``url -> bool`` connectivity check used before downloading (default
        :func:`~experiments.data.sources.can_connect`, 2-second timeout); tests pass a fake.

    Raises:
      DatasetNotFoundError: not prepared, files not found and no download possible; raised
        within a few seconds with the files needed and the command that provides them.
    """
    import tensorflow_datasets as tfds

    spec = get_spec(name)
    builder = builder_class(spec.name)(data_dir=_tfds_data_dir(data_dir))
    # (is_prepared alone logs a misleading warning about a folder that does not exist yet.)
    if not ((builder.data_path / "dataset_info.json").exists() and builder.is_prepared()):
        located = find_manual_files(spec.name, manual_dir)
        if located is None:
            check_can_download(spec, search_path(spec, manual_dir),
                               allow_download=allow_download, probe=probe)
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
    perm = np.random.default_rng([SPLIT_STREAM, check_seed(seed)]).permutation(n)
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
        spec = get_spec(name_or_shape)
        shape, label = spec.image_shape, f"synthetic_{spec.name}"
    else:
        shape = tuple(int(s) for s in name_or_shape)
        if len(shape) != 3:
            raise ValueError(f"shape {shape} must be (H, W, C).")
        label = "synthetic"
    rng = np.random.default_rng([SYNTHETIC_STREAM, check_seed(seed)])
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
        split_seed = check_seed(d.get("split_seed", 0))
        keep = np.sort(np.random.default_rng([SPLIT_STREAM, 1, split_seed])
                       .permutation(len(ds.train_labels))[:num_train])
        ds = dataclasses.replace(ds, train_images=ds.train_images[keep],
                                 train_labels=ds.train_labels[keep])
    return ds
