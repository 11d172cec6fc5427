"""The secured broker of README "Securing the broker" (examples/mosquitto-secure.conf and
examples/mosquitto.acl on top of the shipped settings, a CA from ``edge-agent certs``), with real
mosquitto, real TLS and the real agent and aggregator: a box reaches only its own topics (nor
another box's federated uploads and answers, nor its session), plain TCP and bad credentials are
refused, and the agent says why a connection fails instead of retrying in silence."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fed.signing import generate_keys, load_public_keys, verify_manifest
from agent.fed.topics import FleetTopics
from agent.ops import certs
from tests.integration.conftest import BASE, DEVICE, SITE, query, wait_until, write_agent_config
from tests.integration.fleet import FLEET, box_tensors, upload_frames, write_hq_config
from tests.integration.mosquitto import Mosquitto

PASSWORDS = {"box-1": "pw-box-1", "box-2": "pw-box-2", "aggregator": "pw-aggregator", "operator": "pw-op"}
OTHER = "edge/plant-t/box-2/"  # box-2's namespace
FED = FleetTopics(FLEET)
DENIED = "Not authorized"


class Client:
    """A bare MQTT 5 client over TLS that reports the broker's answers (CONNACK, PUBACK reason codes)
    and records what it receives: a device that does not run edge-agent, or an operator's tool."""

    def __init__(
        self,
        broker: Mosquitto,
        user: str | None = None,
        password: str | None = None,
        *,
        cert: certs.Issued | None = None,
        client_id: str | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
    ):
        assert broker.tls_ca is not None
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.tls_set(
            ca_certs=str(broker.tls_ca),
            certfile=str(cert.cert) if cert else None,
            keyfile=str(cert.key) if cert else None,
        )
        if user and not cert:
            self.client.username_pw_set(user, password if password is not None else PASSWORDS[user])
        self.received: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, str] = {}
        self._cond = threading.Condition()
        self._connack = threading.Event()
        self._suback = threading.Event()
        self.connack: str | None = None
        self.session_present = False
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda *a: self._suback.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        self.client.connect(broker.host, broker.port, clean_start=clean_start, properties=props)
        self.client.loop_start()
        assert self._connack.wait(10), "no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack, self.session_present = str(reason_code), bool(flags.session_present)
        self._connack.set()

    def _on_message(self, client, userdata, m) -> None:
        with self._cond:
            self.received.append((m.topic, bytes(m.payload)))
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self.pubacks[mid] = str(reason_code)
            self._cond.notify_all()

    def subscribe(self, *topics: str) -> Client:
        self._suback.clear()
        self.client.subscribe([(t, 1) for t in topics])
        assert self._suback.wait(10), "no SUBACK"
        return self

    def publish(self, topic: str, payload: Any, retain: bool = False) -> str:
        """QoS 1; the PUBACK's reason: "Success", "No matching subscribers" or "Not authorized"."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1, retain=retain)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.pubacks, 10), f"no PUBACK for {topic}"
            return self.pubacks[info.mid]

    def expect(self, topic: str, pred=lambda m: True, timeout: float = 15.0) -> Any:
        with self._cond:
            found = self._cond.wait_for(
                lambda: next(
                    (json.loads(p) for t, p in self.received if t == topic and pred(json.loads(p))), None
                ),
                timeout,
            )
        assert found, f"nothing on {topic}; got {[t for t, _ in self.received][-10:]}"
        return found

    def flush(self, own_topic: str) -> None:
        """Everything the broker routed to this client before now has arrived: a message to itself
        comes behind it on the same connection."""
        nonce = uuid.uuid4().hex
        assert self.publish(own_topic, {"flush": nonce}) != DENIED
        self.expect(own_topic, lambda m: m.get("flush") == nonce)

    def topics(self) -> set[str]:
        with self._cond:
            return {t for t, _ in self.received}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def broker_section(
    broker: Mosquitto,
    tmp_path: Path,
    user: str | None,
    password: str | None,
    *,
    ca: Path | None = None,
    cert: certs.Issued | None = None,
    tls: bool = True,
) -> str:
    """The [broker] keys and [broker.tls] table of a box on the secured broker."""
    lines = []
    if user:
        pw = tmp_path / f"pw-{uuid.uuid4().hex[:6]}"
        pw.write_text(f"{password}\n")
        lines += [f'username = "{user}"', f'password_file = "{pw}"']
    if tls:
        lines += ["[broker.tls]", f'ca_file = "{ca or broker.tls_ca}"']
        if cert:
            lines += [f'cert_file = "{cert.cert}"', f'key_file = "{cert.key}"']
    return "\n".join(lines) + "\n"


def box_config(
    tmp_path: Path,
    broker: Mosquitto,
    bundle: Path,
    user: str | None = DEVICE,
    password: str | None = None,
    *,
    host: str | None = None,
    name: str = "box",
    **tls: Any,
) -> Path:
    """A bootstrap file for box-1 of plant-t on ``broker``, its [broker] section secured."""
    path = write_agent_config(tmp_path / f"{name}.toml", broker, bundle, tmp_path / f"data-{name}")
    secured = broker_section(broker, tmp_path, user, password or PASSWORDS.get(user or "", ""), **tls)
    text = path.read_text().replace("[engine]", secured + "\n[engine]", 1)
    if host is not None:
        text = text.replace(f'host = "{broker.host}"', f'host = "{host}"', 1)
    path.write_text(text)
    return path


@pytest.fixture
def secure_broker(tmp_path) -> Iterator[Mosquitto]:
    broker = Mosquitto.secured(tmp_path / "secure-broker", PASSWORDS).start()
    yield broker
    broker.stop()


def error_of(agent) -> str:
    return agent.app.transport.last_error or ""


# ---- the ACL: a box's own topics only -----------------------------------------------------------


def test_a_box_uses_its_own_topics_and_no_one_elses(secure_broker, tiny_bundle, start_agent, tmp_path):
    agent = start_agent(box_config(tmp_path, secure_broker, tiny_bundle))
    # The one $SYS topic the agent reads is granted (retained: the broker sends it at once).
    wait_until(lambda: agent.app.transport.stats()["broker_dropped"] is not None, what="$SYS dropped counter")
    op = Client(secure_broker, "operator").subscribe(BASE + "#")
    intruder = Client(secure_broker, "box-2").subscribe("#", "edge/#", BASE + "#", "$SYS/#")
    try:
        # The box serves its own topics over TLS (requests and commands from the operator).
        assert op.publish(BASE + "infer/req", {"id": "op-1", "text": "motor overheating"}) == "Success"
        assert op.expect(BASE + "infer/res", lambda m: m["id"] == "op-1")["predictions"]
        # Another box can write none of them: the broker answers "Not authorized" and drops it.
        forged = {
            "infer/req": {"id": "forged-1", "text": "x"},
            "samples": {"id": "forged-2", "text": "x", "label": "electrical"},
            "cmd": {"id": "forged-3", "cmd": "status"},
            "config": {"version": 99},
        }
        for suffix, payload in forged.items():
            assert intruder.publish(BASE + suffix, payload, retain=suffix == "config") == DENIED, suffix
        assert op.publish(BASE + "cmd", {"id": "op-2", "cmd": "status"}) == "Success"
        status = op.expect(BASE + "cmd/res", lambda m: m["id"] == "op-2")["result"]
        assert status["connected"] and status["mqtt"]["last_error"] is None
        assert status["mqtt"]["broker_dropped"] is not None
        op.flush(BASE + "flush")
        replies = [json.loads(p) for t, p in op.received if t.endswith("/res") or t.endswith("config/state")]
        assert not [r for r in replies if str(r.get("id", "")).startswith("forged")], replies
        assert query(agent.app.boot.db_path, "SELECT COUNT(*) FROM samples WHERE text = 'x'") == [(0,)]
        assert status["config_version"] == 0
        # ... nor read any: subscribed to '#', it got only what it may read (its own and $SYS).
        intruder.flush(OTHER + "flush")
        leaked = {t for t in intruder.topics() if t.startswith(BASE)}
        assert not leaked, leaked
        assert any(t.startswith("$SYS/") for t in intruder.topics())
        # Its own namespace works (the flush above), another site's namespace of its own id too
        # (the ACL's '+': device ids must be unique on the broker).
        assert intruder.publish("edge/plant-other/box-2/status", {"x": 1}) != DENIED
        assert intruder.publish("edge/plant-other/box-1/status", {"x": 1}) == DENIED
    finally:
        op.close()
        intruder.close()


def test_a_box_cannot_take_over_another_boxs_session(secure_broker, tiny_bundle, start_agent, tmp_path):
    """Without use_username_as_clientid, box-2 connecting with box-1's client id would take over
    its persistent session and the broker would throw away what it queued for box-1 (checked with
    2.0.11). Also: the shipped persistence is in force behind the secured listener."""
    config = box_config(tmp_path, secure_broker, tiny_bundle)
    start_agent(config).stop()  # box-1's persistent session now waits on the broker
    op = Client(secure_broker, "operator")
    for i in range(3):
        sample = {"id": f"queued-{i}", "text": f"queued sample {i}", "label": "electrical"}
        assert op.publish(BASE + "samples", sample) == "Success"
    op.close()
    secure_broker.restart()  # graceful: the queue is in the persistence file (section 1)
    thief = Client(
        secure_broker,
        "box-2",
        client_id=f"edge-agent-{SITE}-{DEVICE}",
        clean_start=False,
        session_expiry_s=3600,
    )
    assert thief.connack == "Success" and not thief.session_present, "box-2 got box-1's session"
    thief.close()
    agent = start_agent(config)
    wait_until(
        lambda: (
            query(agent.app.boot.db_path, "SELECT COUNT(*) FROM samples WHERE text LIKE 'queued%'") == [(3,)]
        ),
        what="box-1's queued samples",
    )


# ---- federation: uploads and answers per box ----------------------------------------------------


def test_fed_uploads_and_answers_are_per_box_and_the_aggregator_has_what_it_needs(
    secure_broker, tiny_bundle, tmp_path, spawn_agent
):
    private, public = generate_keys(tmp_path / "keys")
    hq = write_hq_config(
        tmp_path / "hq.toml", secure_broker, tiny_bundle, tmp_path / "hq", private, min_uploads=2
    )
    hq.write_text(
        hq.read_text().replace(
            "[rounds]",
            broker_section(secure_broker, tmp_path, "aggregator", PASSWORDS["aggregator"]) + "\n[rounds]",
        )
    )
    aggregator = spawn_agent(hq, command=("aggregator", "run")).wait_ready()
    boxes = {
        d: Client(secure_broker, d).subscribe(FED.base + "#", f"edge/plant-t/{d}/#")
        for d in ("box-1", "box-2")
    }
    op = Client(secure_broker, "operator").subscribe(FED.base + "#")
    try:
        for box in boxes.values():  # the retained round, written by the aggregator
            assert box.expect(FED.round, lambda m: m["round"] == 1, timeout=30)
        one, two = boxes["box-1"], boxes["box-2"]
        frames = upload_frames(tiny_bundle, "box-2", box_tensors(tiny_bundle, 2), upload_id="spoof")
        # box-1 can neither upload as box-2, nor answer for the aggregator, nor announce anything.
        assert one.publish(FED.upload("box-2"), frames[0]) == DENIED
        assert one.publish(FED.result("box-2"), {"upload_id": "spoof", "status": "accepted"}) == DENIED
        assert one.publish(FED.round, {"round": 99}, retain=True) == DENIED
        assert one.publish(FED.global_manifest, {"version": 99}, retain=True) == DENIED
        assert one.publish(FED.global_chunk(0), b"x", retain=True) == DENIED
        # Each box uploads on its own topic and hears its own answer.
        for i, (device, box) in enumerate(boxes.items(), 1):
            for frame in upload_frames(
                tiny_bundle, device, box_tensors(tiny_bundle, i), upload_id=f"u-{device}"
            ):
                assert box.publish(FED.upload(device), frame) != DENIED
            assert box.expect(FED.result(device), lambda m, d=device: m["upload_id"] == f"u-{d}")[
                "status"
            ] == ("accepted")
        # Two uploads: the round aggregates; every box reads the signed global and its chunks.
        manifest = two.expect(FED.global_manifest, timeout=60)
        verify_manifest(manifest, load_public_keys([public]))
        wait_until(
            lambda: all(
                any(t.startswith(FED.global_manifest + "/chunk/") for t in b.topics()) for b in boxes.values()
            ),
            what="global chunks at both boxes",
        )
        # The aggregator's status (fed/{fleet}/hq/...) reaches operators.
        op.expect(FED.worker_status("hq-1"), timeout=30)
        for device, box in boxes.items():
            other = "box-2" if device == "box-1" else "box-1"
            box.flush(f"edge/plant-t/{device}/flush")
            seen = box.topics()
            assert FED.result(other) not in seen and FED.upload(other) not in seen, (device, seen)
            assert FED.upload(device) not in seen  # uploads go to the aggregator only
        assert FED.result("box-1") in op.topics() and FED.upload("box-1") in op.topics()
        assert "spoof" not in aggregator.log()
    finally:
        for c in (*boxes.values(), op):
            c.close()
        aggregator.terminate()
        aggregator.wait()


# ---- refused connections, and the agent saying why ----------------------------------------------


def test_plain_tcp_is_refused_where_tls_is_required(secure_broker, tiny_bundle, start_agent, tmp_path):
    agent = start_agent(box_config(tmp_path, secure_broker, tiny_bundle, tls=False), connect=False)
    wait_until(lambda: "before answering" in error_of(agent), what="the reason")
    assert "plain TCP" in error_of(agent) and "[broker.tls]" in error_of(agent)
    assert not agent.app.transport.connected
    time.sleep(1.5)  # retries (reconnect delay 0.2-1 s) refused the same way
    assert not agent.app.transport.connected
    assert agent.app.reporter.status()["mqtt"]["connect_failures"] >= 2


def test_a_wrong_password_is_refused_says_why_and_a_rotation_recovers(
    secure_broker, tiny_bundle, tmp_path, spawn_agent
):
    """The agent as systemd runs it: the STATUS line and the log say the broker refused it and
    why. Rotating the box's password (the box's file first, then mosquitto_passwd and SIGHUP on the
    broker) lets the running agent in at its next retry."""
    config = box_config(tmp_path, secure_broker, tiny_bundle, password="new-secret")
    agent = spawn_agent(config).wait_ready()
    expected = (
        f"waiting for broker {secure_broker.host}:{secure_broker.port}: broker refused the connection: "
    )
    wait_until(
        lambda: any(m.startswith("STATUS=" + expected) for m in agent.notify.poll()),
        what="STATUS with the refusal",
    )
    status = next(m for m in agent.notify.poll() if m.startswith("STATUS=" + expected))
    assert DENIED in status and "user 'box-1'" in status and "password_file" in status, status
    wait_until(lambda: "broker refused the connection: Not authorized" in agent.log(), what="logged")
    secure_broker.set_password("box-1", "new-secret")
    wait_until(
        lambda: any(m.startswith("STATUS=connected to") for m in agent.notify.poll()),
        timeout=20,
        what="connected",
    )
    assert "after" in agent.log() and "failed attempts" in agent.log()
    old = Client(secure_broker, "box-1", PASSWORDS["box-1"])
    assert old.connack == DENIED, "the old password still works"
    old.close()
    agent.terminate()
    assert agent.wait() == 0


@pytest.mark.parametrize("case", ["untrusted CA", "hostname mismatch"])
def test_tls_failures_say_why(case, secure_broker, tiny_bundle, start_agent, tmp_path):
    if case == "untrusted CA":
        other = certs.make_ca(tmp_path / "other-ca", "someone else's CA")
        config = box_config(tmp_path, secure_broker, tiny_bundle, ca=other.cert)
        expected = ["failed verification", "certificate", str(other.cert)]
    else:  # the server certificate names 127.0.0.1 only; localhost reaches the same listener
        config = box_config(tmp_path, secure_broker, tiny_bundle, host="localhost")
        expected = ["failed verification", "Hostname mismatch", "does not name 'localhost'"]
    agent = start_agent(config, connect=False)
    wait_until(lambda: "TLS" in error_of(agent), what="a TLS error")
    for text in expected:
        assert text in error_of(agent), error_of(agent)
    assert agent.app.reporter.status()["mqtt"]["last_error"] == error_of(agent)
    assert not agent.app.transport.connected


# ---- mutual TLS: the certificate's CN is the user name -----------------------------------------


def test_mutual_tls_with_the_certificate_as_user_name(tmp_path, tiny_bundle, start_agent):
    broker = Mosquitto.secured(tmp_path / "mtls-broker", {}, identity_as_username=True, crl=True).start()
    try:
        box_cert = broker.client_cert(DEVICE)
        agent = start_agent(box_config(tmp_path, broker, tiny_bundle, user=None, cert=box_cert))
        op = Client(broker, cert=broker.client_cert("operator")).subscribe(BASE + "infer/res")
        assert op.publish(BASE + "infer/req", {"id": "m-1", "text": "pump cavitation"}) == "Success"
        assert op.expect(BASE + "infer/res", lambda m: m["id"] == "m-1")["predictions"]
        op.close()
        # The ACL keys on the CN: box-2's certificate gets box-2's topics, not box-1's.
        intruder = Client(broker, cert=broker.client_cert("box-2"))
        assert intruder.connack == "Success"
        assert intruder.publish(BASE + "infer/req", {"id": "m-2", "text": "x"}) == DENIED
        assert intruder.publish(OTHER + "status", {"x": 1}) != DENIED
        intruder.close()
        # No certificate: the handshake fails, and the agent says what is missing.
        bare = start_agent(box_config(tmp_path, broker, tiny_bundle, user=None, name="bare"), connect=False)
        wait_until(lambda: "client certificate" in error_of(bare), what="the reason")
        assert "cert_file and key_file" in error_of(bare), error_of(bare)
        bare.stop()
        # Revoked (a stolen box): refused once the CRL lists it, with the reason.
        agent.stop()
        certs.revoke(broker.tls_dir, [box_cert.cert])
        broker.reload()  # SIGHUP: mosquitto applies the new CRL
        revoked = start_agent(
            box_config(tmp_path, broker, tiny_bundle, user=None, cert=box_cert, name="rev"), connect=False
        )
        wait_until(lambda: "revoked" in error_of(revoked).lower(), what="the reason")
        assert str(box_cert.cert) in error_of(revoked) and not revoked.app.transport.connected
        revoked.stop()
        # Rotated: a new certificate for the same device id works at once.
        new_cert = certs.make_client(broker.tls_dir, DEVICE, tmp_path / "new-cert")
        start_agent(box_config(tmp_path, broker, tiny_bundle, user=None, cert=new_cert, name="new"))
    finally:
        broker.stop()


# ---- both ways of running the secured broker ----------------------------------------------------


@pytest.mark.parametrize("layout", ["conf.d", "main"])
def test_both_layouts_refuse_anonymous_clients_and_serve_known_ones(layout, tmp_path):
    broker = Mosquitto.secured(tmp_path / layout, PASSWORDS, layout=layout).start()
    try:
        anonymous = Client(broker)
        assert anonymous.connack == DENIED
        anonymous.close()
        assert Client(broker, "box-1", "wrong").connack == DENIED
        box = Client(broker, "box-1").subscribe(BASE + "#")
        assert box.connack == "Success"
        box.flush(BASE + "flush")
        box.close()
    finally:
        broker.stop()
