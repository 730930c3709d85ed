"""Deterministic numpy batching and augmentation, and the seed streams of the data package.

The example order of an epoch is a function of ``(seed, epoch)`` only and the augmentation of a
batch a function of ``(seed, epoch, batch index)`` only, so a resumed run continues at
``(epoch, batch)`` exactly (:func:`iterate_batches` with ``start_batch``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Distinct first words of the seed sequences, so the streams never coincide.
SHUFFLE_STREAM = 0x5348
AUGMENT_STREAM = 0x4155
SPLIT_STREAM = 0x5350
SYNTHETIC_STREAM = 0x5359


def check_seed(seed: int) -> int:
    """``seed`` as an int; it must be >= 0 (a word of a numpy seed sequence)."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    return seed


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of an epoch: a permutation of ``range(n)`` fixed by (seed, epoch)."""
    words = [SHUFFLE_STREAM, check_seed(seed), check_seed(epoch)]
    return np.random.default_rng(words).permutation(n)


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
    return _crop_flip(images, _crop_flip_draws(rng, images.shape[0], padding, flip), padding)


def _crop_flip_draws(rng: np.random.Generator, b: int, padding: int,
                     flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The random draws of :func:`random_crop_flip` for a batch of ``b`` images."""
    p = int(padding)
    dy = rng.integers(0, 2 * p + 1, b)
    dx = rng.integers(0, 2 * p + 1, b)
    return dy, dx, (rng.random(b) < 0.5) if flip else None


def _crop_flip(images: np.ndarray, draws, padding: int) -> np.ndarray:
    b, h, w, _ = images.shape
    dy, dx, mirrored = draws
    p = int(padding)
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = np.arange(w)
    if mirrored is not None:
        cols = np.where(mirrored[:, None], cols[::-1], cols)
    else:
        cols = np.broadcast_to(cols, (b, w))
    rows = dy[:, None] + np.arange(h)  # (B, H)
    cols = dx[:, None] + cols  # (B, W)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def iterate_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *, seed: int = 0,
                    epoch: int = 0, shuffle: bool = True, augment: bool = False,
                    flip: bool = True, padding: int = 4, drop_remainder: bool = True,
                    start_batch: int = 0,
                    rows: slice | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{"image": float32 NHWC in [0, 1], "label": int32}`` batches of one epoch.

    The order is :func:`epoch_permutation` ``(n, seed, epoch)`` (``shuffle=False``: the stored
    order), so every example appears exactly once per epoch. With ``augment``, batch ``i`` is
    cropped (``padding``) and, if ``flip``, mirrored by :func:`random_crop_flip` with a generator
    seeded from ``(seed, epoch, i)``. Batches before ``start_batch`` are skipped without being
    computed, and the rest are identical to an uninterrupted epoch: resume at (epoch, batch).
    ``drop_remainder=False`` yields a final smaller batch. Pass ``flip=dataset.horizontal_flip``
    to follow the dataset's default (only CIFAR-10 flips).

    ``rows`` (data-parallel runs: ``tscnc_jax.parallel.local_rows``) yields only those rows of
    every batch, reading and augmenting only their images; they equal the same rows of the whole
    batch (the augmentation draws are made for the whole batch), so any split of a global batch
    over processes sees the examples of the single-process run.
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
        mine = slice(None) if rows is None else rows
        x = images[idx[mine]]
        if augment:
            rng = np.random.default_rng([AUGMENT_STREAM, check_seed(seed), check_seed(epoch), i])
            draws = _crop_flip_draws(rng, len(idx), padding, flip)
            x = _crop_flip(x, tuple(None if d is None else d[mine] for d in draws), padding)
        yield {"image": x.astype(np.float32) / 255.0, "label": labels[idx[mine]].astype(np.int32)}
