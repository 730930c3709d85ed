"""A run directory: files written so that a crash never leaves half of one, one process at a
time, and the config the run was started with."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "ConfigMismatchError",
    "WorkdirInUseError",
    "append_jsonl",
    "check_config",
    "exclusive",
    "summary_differences",
    "training_differences",
    "truncate_jsonl",
    "write_atomic",
]


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: a reader (or a rerun
    after a crash) sees the old file or the new one, never a part."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def append_jsonl(path: pathlib.Path, record: dict) -> None:
    """Appends ``record`` to the JSON-lines file ``path`` as one line."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: pathlib.Path, drop) -> int:
    """Rewrites ``path`` (atomically) without the records for which ``drop(record)`` is true,
    and without a torn last line; returns how many lines went."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line a killed process left half-written
            dropped += 1
            continue
        if drop(record):
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


# ----------------------------------------------------------------------------------------------
# One process per run directory.
# ----------------------------------------------------------------------------------------------


class WorkdirInUseError(RuntimeError):
    """Another process holds the run directory's lock."""


LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive(workdir: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive OS lock (``flock``) on ``<workdir>/.lock`` for the ``with`` block.

    The kernel releases it when the process ends, however it ends (a crash or ``kill -9``
    leaves no stale lock). A second process on the same directory fails at once with
    :class:`WorkdirInUseError` naming the holder's pid and host.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise WorkdirInUseError(
                f"workdir {workdir} is in use by {holder}: one process per run directory "
                f"(wait for it to finish, or use another --workdir).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# ----------------------------------------------------------------------------------------------
# The config a run was started with.
# ----------------------------------------------------------------------------------------------


CONFIG_FILE = "config.json"

#: Keys that may change between the start of a run and a resume in the same directory: which
#: stages this invocation runs, what the final evaluation measures, logging, and where the data
#: files are found. Every other key decides what is trained (the validation keys ``eval.num_val``
#: and ``eval.pgd_*`` too: they pick the best checkpoint).
RESUMABLE_KEYS = (
    "stages", "progress", "plots", "log_every",
    "eval.final", "eval.num_test", "eval.num_standard", "eval.attacks", "eval.num_lipschitz",
    "eval.lipschitz_steps", "eval.chunk",
    "data.manual_dir", "data.data_dir", "data.allow_download",
)


#: Keys added to the configs after runs were first recorded, each with the value every run
#: recorded before it had in effect: a recorded config that lacks one equals a config that holds
#: this value (so adding a key with its old behaviour as default never makes a resume, or a kept
#: summary, count as another run).
ADDED_KEYS = {
    "data.split_seed": 0,
    "gated_tsc.prior_keep": 0.7,
    "model.dtype": "float32",
    "model.conv_impl": "auto",
    "cnc.estimator": "exact",
    "cnc.k": 1,
    "cnc.iterations": 2,
    "cnc.resync_every": 100,
    "eval.chunk": 0,
}


class ConfigMismatchError(ValueError):
    """A resume whose training keys differ from those the run directory was started with."""


def _flat(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_differences(recorded: Mapping, config: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{key: (recorded value, new value)}`` for the keys outside :data:`RESUMABLE_KEYS` that
    differ between two config dicts (a key present in one only counts as different, except a
    key of :data:`ADDED_KEYS`, which a config without it holds at its old value, and the settings
    of a penalty neither config uses)."""
    a, b = (_comparable(c) for c in (recorded, config))
    resumable = lambda k: any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if not resumable(k) and a.get(k) != b.get(k)}


#: Keys a kept summary may differ in from the run a sweep or study plans under its name, and
#: still stand for that run: progress display, logging, plots and where data files are found.
#: (Unlike a resume, the evaluation keys count: they decide what the summary holds.)
SUMMARY_IGNORED_KEYS = ("progress", "plots", "log_every", "data.manual_dir", "data.data_dir",
                        "data.allow_download")


#: Each penalty's settings section and the per-stage weights that switch it on.
_PENALTY_SECTIONS = {"cnc": "cnc_weight", "tsc": "tsc_weight", "gated_tsc": "gated_tsc_weight"}


def _comparable(config: Mapping) -> dict[str, Any]:
    """``config`` flattened (JSON values), with :data:`ADDED_KEYS` filled in and the settings of
    a penalty that no stage uses (weight 0 in ``dense`` and ``finetune``) left out: they cannot
    change the run."""
    flat = {**ADDED_KEYS, **json.loads(json.dumps(_flat(config), default=str))}
    for section, weight in _PENALTY_SECTIONS.items():
        if all(not flat.get(f"{stage}.{weight}") for stage in ("dense", "finetune")):
            flat = {k: v for k, v in flat.items() if not k.startswith(section + ".")}
    return flat


def summary_differences(summary_config: Mapping, config: Mapping) -> dict[str, tuple[Any, Any]]:
    """``{key: (kept value, planned value)}`` for the keys in which a kept summary's config
    differs from the config a sweep or study would run under the same name. ``init_dir`` counts
    by the name of the run it points to (the same plan under another ``--workdir`` keeps its
    summaries); keys of :data:`ADDED_KEYS` as in :func:`training_differences`."""
    a, b = (_comparable(c) for c in (summary_config, config))
    for d in (a, b):
        if d.get("init_dir"):
            d["init_dir"] = pathlib.PurePath(str(d["init_dir"])).name
        if "stages" in d:  # ("prune,finetune",) from a command line is ("prune", "finetune")
            d["stages"] = [x.strip() for item in d["stages"] for x in str(item).split(",")]
    ignored = lambda k: any(k == r or k.startswith(r + ".") for r in SUMMARY_IGNORED_KEYS)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if not ignored(k) and a.get(k) != b.get(k)}


def check_config(workdir: pathlib.Path, config: Mapping, *, record: bool = True) -> None:
    """Records ``config`` in ``<workdir>/config.json`` at a run's first start (``record``: the
    process that writes the run's files); on a resume, raises :class:`ConfigMismatchError`
    naming every training key that differs."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        if record:
            workdir.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(dict(config), indent=2, default=str))
        return
    diff = training_differences(json.loads(path.read_text()), config)
    if diff:
        lines = "\n  ".join(f"{k}: started with {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ConfigMismatchError(
            f"{workdir} was started with another config; resuming would mix two runs:\n  {lines}"
            f"\nUse a new --workdir for the new config (--config.init_dir reuses finished "
            f"stages), or delete {workdir} to start over. Keys that may change on a resume: "
            f"{', '.join(RESUMABLE_KEYS)}.")
