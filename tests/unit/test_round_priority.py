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
