"""Benchmarks: ``python -m tools.bench {inference,ingest,learning} [options]`` (shared helpers in ``common``)."""
