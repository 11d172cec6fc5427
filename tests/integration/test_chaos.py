"""The quick subset of the chaos suite (``python -m tools.chaos --quick``), in ``make test``: real
processes killed, a broker restarted, forged globals, duplicate uploads, bad configs, a corrupt
adapter, and a few thousand hostile messages; every invariant must hold. ``make chaos`` runs all
of it (every scenario, 100,000 fuzz messages, a 10-minute soak)."""

from __future__ import annotations

from tools.chaos.runner import run
from tools.chaos.scenarios import SCENARIOS


def test_quick_chaos_subset_holds_every_invariant():
    # The stages go to a short /tmp/chaos-* directory (sd_notify socket paths stop at 108 bytes),
    # removed when everything passed and kept for a look when not.
    result = run(quick=True, fuzz_messages=3000, fuzz_examples=100, soak_seconds=0)
    assert set(result["scenarios"]) == {n for n, s in SCENARIOS.items() if s.quick}
    failed = {
        n: (r["error"], [c for c, ok in r["checks"].items() if not ok], r["notes"][-2:])
        for n, r in result["scenarios"].items()
        if not r["passed"]
    }
    assert not failed, failed
    assert result["messages_sent"] > 10_000 and result["messages_lost"] == 0
    assert result["duplicates_applied"] == 0 and result["crashes"] == 0
    assert result["fuzz_passed"], result["fuzz"]
    assert result["fuzz_messages"] >= 3000
