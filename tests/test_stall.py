"""The stall limit of tests/stall.py: a hung process fails, a slow one that computes does not."""

import subprocess
import sys

import pytest
import stall

BUSY = "import time\nwhile time.process_time() < 3.0: pass\nprint('done')"


def test_a_sleeping_process_is_killed_as_hung():
    with pytest.raises(stall.Stalled, match="hung"):
        stall.run([sys.executable, "-c", "import time; time.sleep(600)"], stall=3.0)


def test_a_computing_process_runs_to_the_end_whatever_its_wall_time():
    # 3 CPU seconds: however long a loaded machine makes that, each 20 s window sees progress.
    proc = stall.run([sys.executable, "-c", BUSY], stall=20.0)
    assert proc.returncode == 0 and proc.stdout.strip() == "done"


def test_wait_and_poll_until():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with pytest.raises(stall.Stalled):
        stall.poll_until(proc, lambda: False, stall=3.0)
    assert proc.poll() is not None  # killed
    proc = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL)
    assert stall.wait(proc, stall=20.0) == 0


def test_watch_children_kills_a_hung_child():
    with pytest.raises(stall.Stalled), stall.watch_children(stall=3.0):
        subprocess.run([sys.executable, "-c", "import time; time.sleep(600)"])
