"""The learner reports its own peak memory, not its parent's (the resource guard and the
benchmark's RSS target both read it)."""

import multiprocessing as mp

from agent.learner.round import _peak_rss_mb


def _child_peak(q) -> None:
    q.put(_peak_rss_mb())


def test_spawned_child_peak_rss_excludes_the_parent():
    ballast = bytearray(600 * 2**20)
    for i in range(0, len(ballast), 4096):  # touch every page so it is resident
        ballast[i] = 1
    assert _peak_rss_mb() > 600
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(q,))
    p.start()
    child = q.get(timeout=60)
    p.join(timeout=60)
    del ballast
    # ru_maxrss would report > 600 here: Linux carries the forked parent's RSS across exec.
    assert 0 < child < 300
