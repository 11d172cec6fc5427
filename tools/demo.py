"""`make demo`: the whole system on this machine with its defaults, ending by itself.

1. the default bundle (all-MiniLM-L6-v2, offline) is built by `make` before this runs;
2. the engine answers simulated plant texts with the base model (untrained head: near chance);
3. a LoRA adapter is trained on labeled simulated samples (torch + peft, in a child process
   the way the learner runs), hot-swapped into the running engine, and the same texts are
   answered again;
4. if the daemon is installed, a private mosquitto is started and the agent serves requests over
   MQTT (see `agent.daemon`).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from tools.simulate import labeled_dataset


def _train(bundle: str, texts: list[str], labels: list[str], out: str) -> None:
    # Runs in a spawned child: torch never enters the process that serves inference.
    from agent.learner.train import TrainConfig, train_adapter

    train_adapter(Path(bundle), texts, labels, Path(out), "demo-1", TrainConfig(epochs=4, threads=2))


def _accuracy(engine, data) -> float:
    preds = engine.predict([d.text for d in data])
    return sum(p.label == d.label for p, d in zip(preds, data, strict=True)) / len(data)


def main(argv: list[str] | None = None) -> int:
    from agent.engine import EngineConfig, InferenceEngine

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", default="build/bundle-minilm")
    ap.add_argument("--train-size", type=int, default=800)
    args = ap.parse_args(argv)

    data = labeled_dataset(args.train_size + 300, seed=7, sites=3)
    train, test = data[: args.train_size], data[args.train_size :]
    with InferenceEngine.open(Path(args.bundle), EngineConfig()) as engine:
        print(f"engine: {engine.precision} on {engine.provider}, labels {engine.labels}")
        sample = [d.text for d in test[:5]]
        print("\n-- base model, no adapter (untrained head) --")
        for text, p in zip(sample, engine.predict(sample), strict=True):
            print(f"  {p.label:<13} {p.score:.2f}  {text}")
        before = _accuracy(engine, test)
        print(f"accuracy on {len(test)} held-out texts: {before:.3f}")

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "adapter"
            print(f"\n-- training a LoRA adapter on {len(train)} labeled samples (child process) --")
            t0 = time.perf_counter()
            proc = mp.get_context("spawn").Process(
                target=_train, args=(args.bundle, [d.text for d in train], [d.label for d in train], str(out))
            )
            proc.start()
            # Inference keeps answering while the learner trains.
            served = 0
            while proc.is_alive():
                engine.predict([test[served % len(test)].text])
                served += 1
                time.sleep(0.05)
            proc.join()
            if proc.exitcode != 0:
                print(f"training failed (exit {proc.exitcode})")
                return 1
            print(f"trained in {time.perf_counter() - t0:.0f}s; {served} requests answered meanwhile")
            t0 = time.perf_counter()
            version = engine.activate_adapter(out)
            print(f"hot-swapped adapter {version} in {(time.perf_counter() - t0) * 1000:.1f} ms")
            print("\n-- same texts with the adapter --")
            for text, p in zip(sample, engine.predict(sample), strict=True):
                print(f"  {p.label:<13} {p.score:.2f}  {text}")
            after = _accuracy(engine, test)
            print(f"accuracy on {len(test)} held-out texts: {before:.3f} -> {after:.3f}")
            stats = engine.stats()
            print(f"engine p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms, cache hits {stats['cache_hits']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
