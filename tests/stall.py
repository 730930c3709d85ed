"""Limits for tests that wait on other processes: they fail on a hang, never on a slow machine.

A wall-clock limit (a per-cell timeout, ``subprocess.run(timeout=...)``) fails a healthy run on a
loaded machine: the same notebook cell that takes 60 s on a quiet 2-core machine took over 600 s
on a busy one. A process that computes keeps accumulating CPU time however slowly it runs; a hung
one (a deadlock, a collective waiting for a peer that never arrives, a read that never returns)
does not. So the limits here are on *stalls*: a process tree is killed, and the test fails,
only after :data:`STALL_SECONDS` of wall time during which it used less than
:data:`MIN_PROGRESS` CPU seconds.

* :func:`run`: ``subprocess.run``-like, with the stall limit instead of a timeout.
* :func:`wait` and :func:`communicate`: the same for a :class:`subprocess.Popen` started by the
  test; :func:`poll_until`: waits for a condition (a file appearing) while the process runs.
* :func:`watch_children`: a context manager that watches this process's child processes (e.g.
  a Jupyter kernel) and kills them on a stall, so that whatever waits on them fails.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import psutil

#: Wall seconds without CPU progress after which a process tree counts as hung.
STALL_SECONDS = 300.0
#: CPU seconds a process tree must use per stall window to count as progressing.
MIN_PROGRESS = 1.0
_POLL_SECONDS = 5.0


class Stalled(AssertionError):
    """A watched process tree made no CPU progress for the stall limit (it was killed)."""


def cpu_seconds(pid: int, *, include_root: bool = True) -> float:
    """User + system CPU seconds of process ``pid`` and its living descendants (0 if gone)."""
    try:
        root = psutil.Process(pid)
        procs = ([root] if include_root else []) + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def _kill_tree(pid: int, *, include_root: bool = True) -> None:
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + ([root] if include_root else [])
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


class _Progress:
    """Tracks whether a process tree's CPU time advances by MIN_PROGRESS per STALL_SECONDS."""

    def __init__(self, pid: int, stall: float, include_root: bool = True):
        self.pid, self.stall, self.include_root = pid, stall, include_root
        self.cpu = cpu_seconds(pid, include_root=include_root)
        self.since = time.monotonic()

    def stalled(self) -> bool:
        cpu = cpu_seconds(self.pid, include_root=self.include_root)
        now = time.monotonic()
        if cpu - self.cpu >= MIN_PROGRESS:
            self.cpu, self.since = cpu, now
        return now - self.since >= self.stall

    def message(self, what: str) -> str:
        return (f"{what} used under {MIN_PROGRESS} CPU s in {self.stall:.0f} s of wall time: "
                f"hung (killed)")


def wait(proc: subprocess.Popen, *, stall: float = STALL_SECONDS) -> int:
    """``proc.wait()`` that kills ``proc``'s tree and raises :class:`Stalled` on a stall. Do not
    use it on a process whose pipes nobody reads (use :func:`run` to capture output)."""
    progress = _Progress(proc.pid, stall)
    while True:
        try:
            return proc.wait(timeout=_POLL_SECONDS)
        except subprocess.TimeoutExpired:
            if progress.stalled():
                _kill_tree(proc.pid)
                proc.wait()
                raise Stalled(progress.message(f"pid {proc.pid} ({proc.args!r:.200})")) from None


def communicate(proc: subprocess.Popen, *, stall: float = STALL_SECONDS) -> tuple:
    """``proc.communicate()`` (its piped output) that kills ``proc``'s tree and raises
    :class:`Stalled` on a stall."""
    progress = _Progress(proc.pid, stall)
    while True:
        try:  # a retried communicate() loses no output
            return proc.communicate(timeout=_POLL_SECONDS)
        except subprocess.TimeoutExpired:
            if progress.stalled():
                _kill_tree(proc.pid)
                _, err = proc.communicate()
                raise Stalled(progress.message(f"{proc.args!r:.200}") + "; stderr:\n"
                              f"{(err or '')[-3000:]}") from None


def run(args, *, stall: float = STALL_SECONDS, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, **kwargs)`` without a wall-clock
    timeout: the process tree is killed, raising :class:`Stalled`, only on a stall."""
    kwargs.setdefault("text", True)
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          **kwargs) as proc:
        out, err = communicate(proc, stall=stall)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def poll_until(proc: subprocess.Popen, ready, *, stall: float = STALL_SECONDS,
               interval: float = 0.05) -> bool:
    """Polls ``ready()`` until it is true (returns True) or ``proc`` has ended (returns False);
    kills ``proc``'s tree and raises :class:`Stalled` if it stalls in between."""
    progress = _Progress(proc.pid, stall)
    last_check = time.monotonic()
    while proc.poll() is None:
        if ready():
            return True
        if time.monotonic() - last_check >= _POLL_SECONDS:
            last_check = time.monotonic()
            if progress.stalled():
                _kill_tree(proc.pid)
                proc.wait()
                raise Stalled(progress.message(f"{proc.args!r:.200}"))
        time.sleep(interval)
    return False


@contextlib.contextmanager
def watch_children(*, stall: float = STALL_SECONDS):
    """Watches this process's children while the block runs; on a stall kills them (whatever
    waits on them then fails) and raises :class:`Stalled` when the block ends."""
    import os

    progress = _Progress(os.getpid(), stall, include_root=False)
    done, hung = threading.Event(), []

    def watch():
        while not done.wait(_POLL_SECONDS):
            if progress.stalled():
                hung.append(progress.message("the child processes of this test"))
                _kill_tree(os.getpid(), include_root=False)
                return

    thread = threading.Thread(target=watch, name="stall-watch", daemon=True)
    thread.start()
    try:
        yield
    except Exception as e:
        if hung:
            raise Stalled(hung[0]) from e
        raise
    finally:
        done.set()
        thread.join()
    if hung:
        raise Stalled(hung[0])
