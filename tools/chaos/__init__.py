"""``python -m tools.chaos``: faults, hostile input and a soak against real processes, with invariants.

Every scenario (``scenarios.py``) runs on its own stage (``world.py``): a private mosquitto from
the shipped config, agents and an aggregator as processes on the tiny model, plant devices that
count the broker's PUBACKs. After each: every acknowledged sample in SQLite exactly once, every
queued upload at the aggregator exactly once, the active adapter a verified one, the daemon
answering, no process ended that the scenario did not end. ``fuzz.py`` sends hostile bytes and
JSON at every inbound topic; ``soak.py`` runs minutes of mixed load.

``make chaos`` runs everything (100,000 fuzz messages, a 10-minute soak); ``make test`` runs the
quick subset (``tests/integration/test_chaos.py``).
"""
