"""Tests of experiments.data: the original file formats, the tfds builders, the fast offline
failure, deterministic batching / augmentation and the command line. Offline and fast: the
builders are tested on tiny files written here in the genuine on-disk formats, never on a
download."""

import dataclasses
import gzip
import io
import os
import pathlib
import pickle
import re
import socket
import struct
import sys
import tarfile
import threading
import time

import ml_collections
import numpy as np
import pytest
import stall

from experiments import data
from experiments.data import readers, sources

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """No user environment leaks in: no manual root, no prepared-data dir, no proxy."""
    for var in (data.ENV_MANUAL_DIR, data.ENV_DATA_DIR, data.ENV_OFFLINE, "http_proxy",
                "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any connectivity probe fails the test: nothing here may reach for the network."""

    def forbidden(url, timeout=None):
        raise AssertionError(f"the network probe was called for {url}")

    monkeypatch.setattr(sources, "can_connect", forbidden)


@pytest.fixture
def sockets(monkeypatch):
    """Records every name lookup and connection attempt (and refuses them): a failure that is
    "fast" does not wait on the network, which no wall-clock limit could tell on a loaded
    machine, and tfds' download retries (about 200 s offline) would show up here."""
    attempts = []

    def refuse(what):
        def fn(*args, **kwargs):
            attempts.append((what, args[:2]))
            raise OSError(f"{what} refused by the test")
        return fn

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    return attempts


# ----------------------------------------------------------------------------------------------
# Writers of the genuine formats.
# ----------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    code = codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx_dataset(directory, rng, n_train=7, n_test=5, gzipped=(True, True, True, False)):
    """Four idx files (last one gunzipped and named without .gz by default); returns the arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                        rng.integers(0, 10, n_train).astype(np.uint8)),
              "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                       rng.integers(0, 10, n_test).astype(np.uint8))}
    contents = [arrays["train"][0], arrays["train"][1], arrays["test"][0], arrays["test"][1]]
    for name, array, gz in zip(IDX_FILES, contents, gzipped, strict=True):
        raw = idx_bytes(array)
        if gz:
            (directory / name).write_bytes(gzip.compress(raw))
        else:
            (directory / name.removesuffix(".gz")).write_bytes(raw)
    return arrays


def cifar_pickle(images_hwc: np.ndarray, labels, batch_label: bytes, numpy1_names=True) -> bytes:
    """A batch as the CIFAR-10 python files have it: a protocol-2 dict with bytes keys."""
    n = images_hwc.shape[0]
    d = {b"batch_label": batch_label,
         b"labels": [int(v) for v in labels],
         b"data": images_hwc.transpose(0, 3, 1, 2).reshape(n, 3072).copy(),  # R, G, B planes
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    raw = pickle.dumps(d, protocol=2)
    if numpy1_names:  # the distributed files were written by numpy 1.x
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return raw


def write_cifar_tar(path, rng, per_batch=3, n_test=4):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    counts = [per_batch] * 5 + [n_test]
    images = {n: rng.integers(0, 256, (c, 32, 32, 3), dtype=np.uint8)
              for n, c in zip(names, counts, strict=True)}
    labels = {n: rng.integers(0, 10, c) for n, c in zip(names, counts, strict=True)}
    with tarfile.open(path, "w:gz") as tar:
        for k, n in enumerate(names):
            raw = cifar_pickle(images[n], labels[n], f"batch {n}".encode(), numpy1_names=k % 2 == 0)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        meta = pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    train = (np.concatenate([images[n] for n in names[:5]]),
             np.concatenate([labels[n] for n in names[:5]]))
    return {"train": train, "test": (images["test_batch"], labels["test_batch"])}


def write_svhn_mat(path, rng, n):
    import scipy.io

    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10  # the digit 0 at least once
    scipy.io.savemat(path, {"X": x, "y": y})
    return x, y


# ----------------------------------------------------------------------------------------------
# Formats.
# ----------------------------------------------------------------------------------------------


def test_read_idx_gzipped_plain_and_wide_types(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    (tmp_path / "a").write_bytes(idx_bytes(a))
    # Gzip is recognised by content, not by name.
    (tmp_path / "gz_named_plain").write_bytes(gzip.compress(idx_bytes(a)))
    for name in ("a.gz", "a", "gz_named_plain"):
        np.testing.assert_array_equal(data.read_idx(tmp_path / name), a)
    b = np.array([[1, -2], [70000, 3]], dtype=">i4")
    (tmp_path / "b").write_bytes(idx_bytes(b))
    got = data.read_idx(tmp_path / "b")
    assert got.dtype == np.int32 and got.dtype.isnative
    np.testing.assert_array_equal(got, b)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x1f\x00\x08\x01rest")
    with pytest.raises(ValueError, match="not an idx file"):
        data.read_idx(tmp_path / "bad")
    a = np.zeros((2, 3), np.uint8)
    (tmp_path / "short").write_bytes(idx_bytes(a)[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        data.read_idx(tmp_path / "short")


def test_read_cifar10_archive_and_extracted_directory(tmp_path):
    rng = np.random.default_rng(1)
    expected = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", rng)
    got = data.read_cifar10(tmp_path / "cifar-10-python.tar.gz")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    got_dir = data.read_cifar10(tmp_path / "x")
    for split in ("train", "test"):
        for g in (got, got_dir):
            np.testing.assert_array_equal(g[split][0], expected[split][0])
            np.testing.assert_array_equal(g[split][1], expected[split][1])
    # Channel-major rows: value (c, r, col) of the raw row is pixel (r, col) channel c.
    raw = expected["test"][0].transpose(0, 3, 1, 2).reshape(-1, 3072)
    i, r, col, c = 2, 5, 17, 1
    assert got["test"][0][i, r, col, c] == raw[i, c * 1024 + r * 32 + col]
    assert got["train"][0].shape == (15, 32, 32, 3) and got["test"][0].shape == (4, 32, 32, 3)


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    raw = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        readers._cifar_batch(raw, "evil")


def test_read_svhn_maps_label_10_to_0(tmp_path):
    rng = np.random.default_rng(2)
    x, y = write_svhn_mat(tmp_path / "test_32x32.mat", rng, 6)
    images, labels = data.read_svhn_mat(tmp_path / "test_32x32.mat")
    np.testing.assert_array_equal(images, x.transpose(3, 0, 1, 2))
    np.testing.assert_array_equal(labels, y[:, 0] % 10)
    assert labels[0] == 0 and labels.min() >= 0 and labels.max() <= 9


# ----------------------------------------------------------------------------------------------
# Builders: prepare from a manual directory, load, compare exactly.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_builder_round_trip(tmp_path, no_network, name):
    rng = np.random.default_rng(3)
    expected = write_idx_dataset(tmp_path / "manual", rng)
    ds = data.load_dataset(name, data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual",
                           allow_download=False)
    assert ds.name == name and ds.num_classes == 10 and not ds.horizontal_flip
    for split in ("train", "test"):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        np.testing.assert_array_equal(images, expected[split][0][..., None])
        np.testing.assert_array_equal(labels, expected[split][1])
    assert ds.val_images.shape == (0, 28, 28, 1)
    assert (tmp_path / "tfds" / f"tscnc_{name}" / "1.0.0").is_dir()
    # Prepared once: the original files are no longer needed.
    for f in (tmp_path / "manual").iterdir():
        f.unlink()
    again = data.load_dataset(name, data_dir=tmp_path / "tfds", allow_download=False)
    np.testing.assert_array_equal(again.train_images, ds.train_images)


def test_manual_root_env_var_uses_per_dataset_subdirectory(tmp_path, monkeypatch, no_network):
    rng = np.random.default_rng(4)
    expected = write_idx_dataset(tmp_path / "root" / "mnist", rng)
    write_idx_dataset(tmp_path / "root", rng)  # flat files: ambiguous, must not be used
    monkeypatch.setenv(data.ENV_MANUAL_DIR, str(tmp_path / "root"))
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "tfds"))
    ds = data.load_dataset("mnist", allow_download=False)
    np.testing.assert_array_equal(ds.test_images[..., 0], expected["test"][0])
    assert (tmp_path / "tfds" / "tscnc_mnist").is_dir()


def test_cifar10_builder_round_trip(tmp_path, no_network):
    rng = np.random.default_rng(5)
    (tmp_path / "manual").mkdir()
    expected = write_cifar_tar(tmp_path / "manual" / "cifar-10-python.tar.gz", rng)
    ds = data.load_dataset("cifar10", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual",
                           allow_download=False)
    assert ds.horizontal_flip and ds.image_shape == (32, 32, 3)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), expected[split][0])
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), expected[split][1])


def test_svhn_builder_round_trip(tmp_path, no_network):
    rng = np.random.default_rng(6)
    manual = tmp_path / "root" / "svhn_cropped"
    manual.mkdir(parents=True)
    x_train, y_train = write_svhn_mat(manual / "train_32x32.mat", rng, 9)
    x_test, y_test = write_svhn_mat(manual / "test_32x32.mat", rng, 4)
    # manual_dir may also name the parent of a <name>/ subdirectory.
    ds = data.load_dataset("svhn_cropped", data_dir=tmp_path / "tfds",
                           manual_dir=tmp_path / "root", allow_download=False)
    assert not ds.horizontal_flip
    np.testing.assert_array_equal(ds.train_images, x_train.transpose(3, 0, 1, 2))
    np.testing.assert_array_equal(ds.test_images, x_test.transpose(3, 0, 1, 2))
    np.testing.assert_array_equal(ds.train_labels, y_train[:, 0] % 10)
    np.testing.assert_array_equal(ds.test_labels, y_test[:, 0] % 10)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_download_path_with_a_fake_download_manager(tmp_path, monkeypatch, name):
    """Online: the files come from tfds' download manager (faked here: no network is used)."""
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(8)
    store = tmp_path / "downloaded"
    if name == "mnist":
        expected = write_idx_dataset(store, rng, gzipped=(True,) * 4)
    else:
        store.mkdir()
        expected = write_cifar_tar(store / "cifar-10-python.tar.gz", rng)
    spec = data.DATASETS[name]
    requested = []

    def fake_download(self, urls):
        requested.append(urls)
        out = {}
        for f, url in urls.items():  # tfds names downloads after the URL, plus a hash
            target = store / f"{url.split('//')[1].replace('/', '_')}.abc123"
            (store / f).rename(target)
            out[f] = target
        return out

    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    probed = []
    monkeypatch.setattr(sources, "can_connect",
                        lambda url, timeout=None: probed.append(url) or True)
    ds = data.load_dataset(name, data_dir=tmp_path / "tfds")
    assert requested == [spec.urls] and probed  # probed before downloading
    np.testing.assert_array_equal(ds.test_images.reshape(expected["test"][0].shape),
                                  expected["test"][0])
    np.testing.assert_array_equal(ds.train_labels, expected["train"][1])


def test_builders_are_registered_with_tfds(tmp_path):
    import tensorflow_datasets as tfds

    data.builder_class("mnist")  # registration happens on first use
    builder = tfds.builder("tscnc_cifar10", data_dir=tmp_path)
    assert isinstance(builder, data.builder_class("cifar10"))
    assert builder.info.features["image"].shape == (32, 32, 3)
    assert str(builder.info.file_format.value) == "array_record"


# ----------------------------------------------------------------------------------------------
# Offline without files: a fast, useful failure.
# ----------------------------------------------------------------------------------------------


def _no_debian(monkeypatch, tmp_path):
    spec = dataclasses.replace(data.DATASETS["fashion_mnist"], debian_dir=tmp_path / "no_debian")
    monkeypatch.setitem(data.DATASETS, "fashion_mnist", spec)
    return spec


def test_offline_failure_is_fast_and_says_what_to_do(tmp_path, monkeypatch, no_network,
                                                     sockets):
    _no_debian(monkeypatch, tmp_path)
    monkeypatch.setenv(data.ENV_MANUAL_DIR, str(tmp_path / "root"))
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset("fashion_mnist", data_dir=tmp_path / "tfds", allow_download=False)
    assert sockets == []  # fast: nothing waited on the network
    msg = str(info.value)
    for f in IDX_FILES:
        assert f in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "root" / "fashion_mnist") in msg
    assert str(tmp_path / "no_debian") in msg
    assert "allow_download=False" in msg
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in msg
    assert isinstance(info.value, FileNotFoundError)
    assert not (tmp_path / "tfds" / "tscnc_fashion_mnist" / "1.0.0").exists()


def test_offline_failure_when_probe_fails(tmp_path, monkeypatch, sockets):
    calls = []

    def unreachable(url):
        calls.append(url)
        return False

    with pytest.raises(data.DatasetNotFoundError, match="No network") as info:
        data.load_dataset("cifar10", data_dir=tmp_path, probe=unreachable)
    assert sockets == []  # one probe, then the error: no download attempt
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and "curl -fLO https://www.cs.toronto.edu" in msg
    assert data.ENV_MANUAL_DIR in msg


def test_offline_env_var_disables_downloads(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv(data.ENV_OFFLINE, "1")
    with pytest.raises(data.DatasetNotFoundError, match=data.ENV_OFFLINE) as info:
        data.load_dataset("svhn_cropped", data_dir=tmp_path)
    assert "train_32x32.mat" in str(info.value) and "test_32x32.mat" in str(info.value)


def test_explicit_manual_dir_without_files_is_an_error(tmp_path, no_network):
    write_idx_dataset(tmp_path / "incomplete", np.random.default_rng(7),
                      gzipped=(True, True, True, True))
    (tmp_path / "incomplete" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DatasetNotFoundError, match="given explicitly") as info:
        data.load_dataset("mnist", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "incomplete")
    assert "lacks t10k-labels-idx1-ubyte.gz" in str(info.value)


def test_direct_tfds_use_also_fails_fast(tmp_path, monkeypatch, sockets):
    import tensorflow_datasets as tfds

    probes = []
    monkeypatch.setattr(sources, "can_connect",
                        lambda url, timeout=None: probes.append(url) or False)
    builder = data.builder_class("mnist")(data_dir=tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match="No network"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=tmp_path / "empty", try_download_gcs=False))
    assert len(probes) == 1 and sockets == []  # one bounded probe, no download retries


def test_can_connect_on_loopback_only():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert data.can_connect(f"http://127.0.0.1:{port}/x", timeout=1.0)
    # The port is closed now: refused at once, long before the (generous) timeout.
    t0 = time.perf_counter()
    assert not data.can_connect(f"http://127.0.0.1:{port}/x", timeout=120.0)
    assert time.perf_counter() - t0 < 60.0


def test_can_connect_is_bounded_even_if_connect_hangs(monkeypatch):
    released = threading.Event()

    def hang(address, timeout=None):  # ignores its timeout, as a stuck name lookup can
        released.wait(600.0)
        raise OSError("too late")

    monkeypatch.setattr(sources.socket, "create_connection", hang)
    t0 = time.perf_counter()
    try:
        assert not data.can_connect("https://example.invalid/", timeout=0.2)
        # Far below the hang: the probe gave up at its own deadline (a margin for load).
        assert time.perf_counter() - t0 < 300.0
    finally:
        released.set()


def test_probe_goes_through_the_proxy(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.local:3128")
    monkeypatch.setenv("no_proxy", "")
    target = sources._probe_target
    assert target("https://www.cs.toronto.edu/~kriz/x") == ("proxy.local", 3128)
    monkeypatch.delenv("https_proxy")
    assert target("https://www.cs.toronto.edu/~kriz/x") == ("www.cs.toronto.edu", 443)
    assert target("http://ufldl.stanford.edu/h/x.mat") == ("ufldl.stanford.edu", 80)


def test_command_line_output_and_exit_codes(tmp_path):
    """``python -m experiments.data NAME...``: a line per dataset loaded, 1 and the message on
    stderr when one is not found, 2 on a usage error."""
    write_idx_dataset(tmp_path / "root" / "mnist", np.random.default_rng(9))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update({data.ENV_MANUAL_DIR: str(tmp_path / "root"), data.ENV_OFFLINE: "1"})

    def cli(*args):
        return stall.run([sys.executable, "-m", "experiments.data", *args], cwd=ROOT, env=env)

    ok = cli("mnist", f"--data_dir={tmp_path / 'tfds'}", "--no_download")
    assert ok.returncode == 0, ok.stderr[-3000:]
    # (tfds' own lines about preparing come first.)
    assert re.fullmatch(r"Dataset\('mnist', train=7, val=0, test=5, image_shape=\(28, 28, 1\), "
                        r"num_classes=10\) in \d+\.\d s", ok.stdout.splitlines()[-1])
    # Several names; one not found: its message on stderr, the others still loaded.
    both = cli("svhn_cropped", "mnist", "--data_dir", str(tmp_path / "tfds"), "--no_download")
    assert both.returncode == 1, both.stderr[-3000:]
    assert "train_32x32.mat" in both.stderr and "allow_download=False" in both.stderr
    assert both.stdout.splitlines()[-1].startswith("Dataset('mnist', train=7, val=0, test=5")
    for args in ((), ("bogus",), ("mnist", "--no_such_flag")):
        bad = cli(*args)
        assert bad.returncode == 2, (args, bad.stderr[-3000:])
        assert not bad.stdout


# ----------------------------------------------------------------------------------------------
# Splits and synthetic data.
# ----------------------------------------------------------------------------------------------


def test_train_val_split_is_disjoint_and_deterministic():
    ds = data.synthetic_dataset("mnist", num_train=100, num_test=20, seed=1)
    # Tag each training image with its index to trace where it went.
    tagged = ds.train_images.copy()
    tagged[:, 0, 0, 0] = np.arange(100)
    ds = dataclasses.replace(ds, train_images=tagged)
    a = data.train_val_split(ds, 30, seed=4)
    b = data.train_val_split(ds, 30, seed=4)
    c = data.train_val_split(ds, 30, seed=5)
    train_ids, val_ids = a.train_images[:, 0, 0, 0], a.val_images[:, 0, 0, 0]
    assert len(train_ids) == 70 and len(val_ids) == 30
    assert sorted(np.concatenate([train_ids, val_ids]).tolist()) == list(range(100))
    np.testing.assert_array_equal(a.val_images, b.val_images)
    assert not np.array_equal(a.val_images, c.val_images)
    np.testing.assert_array_equal(a.val_labels, ds.train_labels[val_ids])
    assert a.test_images is ds.test_images
    with pytest.raises(ValueError):
        data.train_val_split(ds, 100)


def test_synthetic_dataset_shapes_determinism_and_signal():
    ds = data.synthetic_dataset("cifar10", num_train=400, num_test=200, seed=3)
    assert ds.train_images.shape == (400, 32, 32, 3) and ds.test_images.shape == (200, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    again = data.synthetic_dataset("cifar10", num_train=400, num_test=200, seed=3)
    np.testing.assert_array_equal(ds.train_images, again.train_images)
    # A nearest-class-mean classifier learns it.
    x = ds.train_images.reshape(400, -1).astype(np.float32)
    means = np.stack([x[ds.train_labels == k].mean(0) for k in range(10)])
    xt = ds.test_images.reshape(200, -1).astype(np.float32)
    pred = np.argmin(((xt[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == ds.test_labels).mean() > 0.9
    assert data.synthetic_dataset((8, 8, 2), 10, 5).train_images.shape == (10, 8, 8, 2)


def test_load_for_config_synthetic():
    c = ml_collections.ConfigDict({
        "dataset": "synthetic", "num_classes": 10, "seed": 0,
        "data": {"manual_dir": None, "data_dir": None, "allow_download": False, "num_val": 64,
                 "synthetic_shape": (28, 28, 1), "synthetic_train": 256, "synthetic_test": 64}})
    ds = data.load_for_config(c)
    assert ds.train_images.shape == (192, 28, 28, 1)
    assert ds.val_images.shape == (64, 28, 28, 1) and ds.test_images.shape == (64, 28, 28, 1)


# ----------------------------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------------------------


def _indexed(n, shape=(4, 4, 1)):
    """Images whose first pixel is the example index (n <= 256), labels = index % 10."""
    images = np.zeros((n, *shape), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images, (np.arange(n) % 10).astype(np.int32)


def _ids(batch):
    return np.round(batch["image"][:, 0, 0, 0] * 255).astype(int)


def test_shuffling_is_a_function_of_seed_and_epoch():
    images, labels = _indexed(100)
    run = lambda seed, epoch, **kw: [
        _ids(b) for b in data.iterate_batches(images, labels, 10, seed=seed, epoch=epoch, **kw)]
    e0, e0_again, e1 = run(7, 0), run(7, 0), run(7, 1)
    assert all(np.array_equal(a, b) for a, b in zip(e0, e0_again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(e0, run(8, 0), strict=True))
    for epoch in (e0, e1):  # every example exactly once
        assert sorted(np.concatenate(epoch).tolist()) == list(range(100))
    np.testing.assert_array_equal(np.concatenate(e0), data.epoch_permutation(100, 7, 0))
    np.testing.assert_array_equal(np.concatenate(run(7, 3, shuffle=False)), np.arange(100))


def test_batches_resume_exactly_and_remainder():
    images, labels = _indexed(103)
    full = list(data.iterate_batches(images, labels, 10, seed=1, epoch=2, augment=True))
    resumed = list(data.iterate_batches(images, labels, 10, seed=1, epoch=2, augment=True,
                                        start_batch=6))
    assert len(full) == 10 and len(resumed) == 4
    for a, b in zip(full[6:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    tail = list(data.iterate_batches(images, labels, 10, seed=1, epoch=2, drop_remainder=False))
    assert len(tail) == 11 and tail[-1]["label"].shape == (3,)
    assert data.num_batches(103, 10) == 10 and data.num_batches(103, 10, False) == 11
    batch = full[0]
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["label"], _ids(tail[0]) % 10)


def _windows(image, padding, flip):
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    h, w = image.shape[:2]
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            out.append(crop)
            if flip:
                out.append(crop[:, ::-1])
    return out


@pytest.mark.parametrize("flip", [True, False])
def test_random_crop_flip_gives_windows_of_the_padded_image(flip):
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (64, 8, 8, 3), dtype=np.uint8)
    out = data.random_crop_flip(images, np.random.default_rng(1), padding=2, flip=flip)
    assert out.shape == images.shape and out.dtype == np.uint8
    mirrored = shifted = 0
    for x, y in zip(images, out, strict=True):
        candidates = _windows(x, 2, flip)
        assert any(np.array_equal(y, c) for c in candidates)
        mirrored += not any(np.array_equal(y, c) for c in _windows(x, 2, False))
        shifted += not (np.array_equal(y, x) or np.array_equal(y, x[:, ::-1]))
    assert shifted > 40  # 24 of 25 offsets move the image
    assert (mirrored > 15) if flip else (mirrored == 0)


def test_augmented_batches_range_and_determinism():
    ds = data.synthetic_dataset("cifar10", num_train=64, num_test=8, seed=0)
    kw = dict(seed=3, epoch=1, augment=True, flip=ds.horizontal_flip)
    a = list(data.iterate_batches(ds.train_images, ds.train_labels, 16, **kw))
    b = list(data.iterate_batches(ds.train_images, ds.train_labels, 16, **kw))
    plain = list(data.iterate_batches(ds.train_images, ds.train_labels, 16, seed=3, epoch=1))
    for x, y, p in zip(a, b, plain, strict=True):
        assert x["image"].shape == (16, 32, 32, 3) and x["image"].dtype == np.float32
        assert 0.0 <= x["image"].min() and x["image"].max() <= 1.0
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], p["label"])  # same order as without augment
        assert not np.array_equal(x["image"], p["image"])
        assert (x["image"] == 0).any()  # the zero padding shows


# ----------------------------------------------------------------------------------------------
# The real Fashion-MNIST of the Debian package, when installed.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not all((data.DEBIAN_FASHION_MNIST_DIR / f).is_file() for f in IDX_FILES),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package(tmp_path, no_network):
    ds = data.load_dataset("fashion_mnist", data_dir=tmp_path, allow_download=False)
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
    raw = data.read_idx(data.DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(ds.test_images[..., 0], raw)
