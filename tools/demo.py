"""`make demo`: the whole system on this machine with its defaults, ending by itself (~3-5 min).

1. `make` builds the default bundle (all-MiniLM-L6-v2, offline) before this runs;
2. a private mosquitto starts from the shipped examples/mosquitto.conf on a free port, and
   `edge-agent run` connects to it as a box would;
3. a client asks the agent to classify plant texts over MQTT (base model: untrained head);
4. a simulated plant publishes labeled samples; the agent stores them (acked after commit), its
   learner trains a LoRA adapter in a spawned process while inference keeps answering, the gate
   compares it with the active one on the holdout, and the agent hot-swaps it;
5. the same questions again, accuracy before/after, the learner's event and a telemetry line;
6. SIGTERM: the agent drains, commits and exits 0; the broker stops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from tests.integration.mosquitto import Mosquitto
from tools.simulate import labeled_dataset

SITE, DEVICE = "demo-plant", "line1-box1"
BASE = f"edge/{SITE}/{DEVICE}/"


class Client:
    """A plant-side MQTT client: publishes, and keeps what the agent says."""

    def __init__(self, port: int):
        self.msgs: list[tuple[str, dict]] = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-plant", protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(BASE + "#", qos=1)
        self.c.loop_start()

    def _on_message(self, client, userdata, m) -> None:
        try:
            body = json.loads(m.payload)
        except ValueError:
            return
        with self.cond:
            self.msgs.append((m.topic[len(BASE) :], body))
            self.cond.notify_all()

    def publish(self, suffix: str, body: dict, retain: bool = False) -> None:
        self.c.publish(BASE + suffix, json.dumps(body), qos=1, retain=retain).wait_for_publish(10)

    def expect(self, suffix: str, pred, timeout: float, after: int = 0) -> dict:
        """The first message on ``suffix`` matching ``pred`` among those received after index ``after``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for topic, body in self.msgs[after:]:
                    if topic == suffix and pred(body):
                        return body
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"nothing on {suffix} within {timeout:.0f}s")
                self.cond.wait(left)

    def ask(self, rid: str, texts: list[str]) -> dict:
        self.publish("infer/req", {"id": rid, "texts": texts})
        return self.expect("infer/res", lambda b: b.get("id") == rid, 120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", default="build/bundle-minilm")
    ap.add_argument("--workdir", default="build/demo")
    ap.add_argument("--samples", type=int, default=600)
    args = ap.parse_args(argv)

    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # The shipped examples/mosquitto.conf (persistence, queue limits), on a free port, with its
    # persistence file and log in the work directory.
    broker = Mosquitto(work / "broker").start()
    port = broker.port
    config = work / "edge-agent.toml"
    config.write_text(
        f'site = "{SITE}"\ndevice = "{DEVICE}"\ndata_dir = "{work / "data"}"\n'
        f'bundle = "{Path(args.bundle).resolve()}"\nlog_level = "INFO"\n\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
    )
    log = (work / "agent.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    print(f"mosquitto on 127.0.0.1:{port}; edge-agent started (log: {work / 'agent.log'})")
    try:
        time.sleep(1.0)
        plant = Client(port)
        plant.expect("status", lambda b: b.get("state") == "online", 180)
        print("agent online")
        data = labeled_dataset(args.samples + 200, seed=7, sites=1)
        train, test = data[: args.samples], data[args.samples :]
        questions = [d.text for d in test[:5]]

        def report(rid: str, title: str) -> float:
            print(f"\n-- {title} --")
            res = plant.ask(rid, questions)
            for text, p in zip(questions, res["predictions"], strict=True):
                print(f"  {p['label']:<13} {p['score']:.2f}  {text}")
            preds = plant.ask(rid + "-all", [d.text for d in test])["predictions"]
            acc = sum(p["label"] == d.label for p, d in zip(preds, test, strict=True)) / len(test)
            print(f"adapter {res['adapter_version']}; accuracy on {len(test)} held-out texts: {acc:.3f}")
            return acc

        before = report("q0", "base model over MQTT (untrained head)")
        plant.publish(
            "config",
            {
                "version": 1,
                "learning": {
                    "enabled": True,
                    "min_new_samples": args.samples // 2,
                    "min_interval_s": 0,
                    "epochs": 4,
                    "max_cpu_percent": 100,
                    "min_free_memory_mb": 256,
                    "max_inference_p99_ms": 10000,
                },
                "telemetry": {"interval_s": 5},
            },
            retain=True,
        )
        state = plant.expect("config/state", lambda b: b.get("version") == 1, 30)
        print(f"\nruntime config v1 {state['status']} (learning enabled)")
        print(f"publishing {len(train)} labeled samples from a simulated plant ...")
        for i, d in enumerate(train):
            plant.publish("samples", {"id": f"demo-{i}", "text": d.text, "label": d.label})
        started = plant.expect("learner", lambda b: b.get("event") == "round_started", 120)
        print(f"learner round {started['version']} started ({started['reason']}) in a spawned process")
        t0 = time.monotonic()
        answered = 0
        while True:  # inference keeps answering while the learner trains
            try:
                finished = plant.expect("learner", lambda b: b.get("event") == "round_finished", 1)
                break
            except TimeoutError:
                plant.ask(f"during-{answered}", [test[answered % len(test)].text])
                answered += 1
                if time.monotonic() - t0 > 900:
                    raise
        print(
            f"round finished in {time.monotonic() - t0:.0f}s: {finished['status']}"
            f" (holdout {finished.get('active_accuracy', 0):.3f} -> {finished.get('candidate_accuracy', 0):.3f});"
            f" {answered} requests answered meanwhile"
        )
        after = report("q1", "same questions after the hot swap")
        print(f"\naccuracy {before:.3f} -> {after:.3f}")
        tele = plant.expect("telemetry", lambda b: True, 30, after=len(plant.msgs))
        inf = tele.get("inference", {})
        print(
            f"telemetry: inference p50 {inf.get('p50_ms', 0):.1f} ms, p99 {inf.get('p99_ms', 0):.1f} ms,"
            f" precision {inf.get('precision')}, store {tele.get('store')}"
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(60)
        print(f"\nagent stopped with exit code {code} (SIGTERM: drain, commit, disconnect)")
        broker.stop()
    return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
