"""Datasets for the experiments: real loaders without TensorFlow, and deterministic numpy batching.

Supported datasets: ``mnist``, ``fashion_mnist``, ``cifar10``, ``svhn_cropped`` (real data) and
:func:`synthetic_dataset` (no files; for smoke tests).

Modules (everything below is importable from ``experiments.data`` itself):

- :mod:`~experiments.data.readers`: the original file formats and the per-dataset readers and
  locators of the files;
- :mod:`~experiments.data.sources`: the dataset specs (:data:`DATASETS`), the places searched for
  the original files, the network probe, download permission and :class:`DatasetNotFoundError`;
- :mod:`~experiments.data.builders`: the tfds builders, :class:`Dataset`, :func:`load_dataset`,
  :func:`train_val_split`, :func:`synthetic_dataset` and :func:`load_for_config`;
- :mod:`~experiments.data.pipeline`: deterministic batching and augmentation
  (:func:`iterate_batches`);
- ``python -m experiments.data NAME`` prepares and loads a dataset once and prints its shapes
  (``--data_dir``, ``--manual_dir``, ``--no_download``).

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

from experiments.data.builders import (
    Dataset,
    builder_class,
    load_dataset,
    load_for_config,
    synthetic_dataset,
    train_val_split,
)
from experiments.data.pipeline import (
    epoch_permutation,
    iterate_batches,
    num_batches,
    random_crop_flip,
)
from experiments.data.readers import read_cifar10, read_idx, read_svhn_mat
from experiments.data.sources import (
    DATASETS,
    ENV_DATA_DIR,
    ENV_MANUAL_DIR,
    ENV_OFFLINE,
    DatasetNotFoundError,
    DatasetSpec,
    can_connect,
    find_manual_files,
)
from experiments.data.sources import DEBIAN_FASHION_MNIST_DIR as DEBIAN_FASHION_MNIST_DIR

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
