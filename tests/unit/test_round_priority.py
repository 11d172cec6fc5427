"""The learner process yields the CPU to inference: SCHED_IDLE (Linux) plus nice."""

import multiprocessing as mp
import os

from agent.learner.round import _lower_priority


def _child_priority(q) -> None:
    _lower_priority(10)
    q.put((os.sched_getscheduler(0), os.nice(0)))


def test_learner_process_runs_sched_idle_and_niced():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_priority, args=(q,))
    p.start()
    policy, nice = q.get(timeout=60)
    p.join(timeout=60)
    assert policy == os.SCHED_IDLE
    assert nice >= 10
    # The parent (the daemon, inference) keeps its normal policy.
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


PARENT = """
import multiprocessing as mp, sys, time
from agent.learner.round import _die_with_parent

def child():
    _die_with_parent()
    time.sleep(120)

if __name__ == "__main__":
    p = mp.get_context("spawn").Process(target=child, daemon=True)
    p.start()
    print(p.pid, flush=True)
    time.sleep(120)
"""


def test_the_learner_dies_with_a_daemon_killed_9(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child has made its prctl call
    os.kill(child, 0)  # alive while its parent is
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/status") as f:
                if "State:\tZ" in f.read():
                    return  # killed; only not yet reaped by whoever adopted it
        except FileNotFoundError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the learner outlived its daemon")
