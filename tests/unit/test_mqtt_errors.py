"""MqttClient says why a connection failed, driven through its paho callbacks (no broker; the
integration tests in tests/integration/test_broker_security.py do it against mosquitto)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BrokerConfig, TlsConfig
from agent.mqtt import MqttClient, Will
from agent.ops import certs


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, TlsConfig]:
    """paho loads the TLS files when the client is made: real ones, from edge-agent certs."""
    d = tmp_path_factory.mktemp("tls")
    ca = certs.make_ca(d)
    client = certs.make_client(d, "box-1")
    return {
        "server_only": TlsConfig(ca_file=ca.cert),
        "mutual": TlsConfig(ca_file=ca.cert, cert_file=client.cert, key_file=client.key),
    }


def make(**broker) -> MqttClient:
    return MqttClient(
        BrokerConfig(host="broker.plant", port=8883, **broker),
        "edge-agent-s-box-1",
        will=Will("edge/s/box-1/status", {"state": "offline"}),
        subscriptions={},
        on_message=lambda m: None,
    )


def refuse(client: MqttClient, name: str) -> None:
    client._on_pre_connect(None, None)
    client._on_connect(
        None, None, SimpleNamespace(session_present=False), ReasonCode(PacketTypes.CONNACK, name), None
    )
    client._on_disconnect(None, None, None, ReasonCode(PacketTypes.DISCONNECT, "Protocol error"), None)


def fail_with(client: MqttClient, exc: BaseException) -> None:
    client._on_pre_connect(None, None)
    try:
        raise exc
    except OSError:  # paho calls on_connect_fail inside its `except OSError`
        client._on_connect_fail(None, None)


def test_a_refused_login_names_the_reason_user_and_password_source(tmp_path, caplog):
    (tmp_path / "pw").write_text("secret\n")
    client = make(username="box-1", password_file=tmp_path / "pw")
    with caplog.at_level(logging.ERROR, "agent.mqtt"):
        refuse(client, "Not authorized")
    error = client.last_error
    assert error.startswith("broker refused the connection: Not authorized; ")
    assert "user 'box-1'" in error and f"password_file {tmp_path / 'pw'}" in error
    assert "secret" not in error
    # The close that follows the refused CONNACK does not overwrite the reason.
    assert client.last_error == error and client.stats()["last_error"] == error
    assert client.stats()["connect_failures"] == 1
    assert [r.getMessage() for r in caplog.records] == [f"mqtt broker.plant:8883: {error} (retrying)"]


def test_a_refusal_without_a_user_says_so(tls_files):
    client = make()
    refuse(client, "Bad user name or password")
    assert "Bad user name or password" in client.last_error
    assert "no broker.username set" in client.last_error
    cert = make(tls=tls_files["mutual"])
    refuse(cert, "Not authorized")
    assert "client certificate's CN" in cert.last_error


def test_the_same_error_is_logged_once_then_now_and_then(caplog, tmp_path, monkeypatch):
    (tmp_path / "mqtt-password").write_text("secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    client = make(username="box-1", password_credential="mqtt-password")
    with caplog.at_level(logging.DEBUG, "agent.mqtt"):
        for _ in range(5):
            refuse(client, "Not authorized")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "password_credential 'mqtt-password'" in errors[0].getMessage()
    assert client.stats()["connect_failures"] == 5
    client._error_logged_at -= 301  # five minutes later: said again, with the count
    with caplog.at_level(logging.ERROR, "agent.mqtt"):
        refuse(client, "Not authorized")
    assert "(retrying, 6 attempts so far)" in caplog.records[-1].getMessage()


def test_tls_verification_failures_say_what_to_check(tls_files):
    client = make(tls=tls_files["server_only"])
    ca = tls_files["server_only"].ca_file
    untrusted = ssl.SSLCertVerificationError(
        1,
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in certificate chain",
    )
    untrusted.verify_message = "self-signed certificate in certificate chain"
    fail_with(client, untrusted)
    assert client.last_error == (
        "TLS: the broker's certificate failed verification: self-signed certificate in certificate chain; "
        f"is broker.tls.ca_file ({ca}) the CA that signed it, and is it still valid?"
    )
    mismatch = ssl.SSLCertVerificationError(
        1,
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, certificate is not "
        "valid for 'broker.plant'.",
    )
    mismatch.verify_message = "Hostname mismatch, certificate is not valid for 'broker.plant'."
    fail_with(client, mismatch)
    assert "does not name 'broker.plant' (broker.host)" in client.last_error
    assert "edge-agent certs server --host" in client.last_error


def test_a_broker_that_is_not_there_or_not_tls():
    client = make()
    fail_with(client, ConnectionRefusedError(111, "Connection refused"))
    assert client.last_error.startswith("connection refused; is the broker running")
    # Plain TCP to a TLS listener: mosquitto resets the connection before any CONNACK.
    client._on_pre_connect(None, None)
    client._on_log(
        None, None, paho.MQTT_LOG_ERR, "failed to receive on socket: [Errno 104] Connection reset by peer"
    )
    client._on_disconnect(None, None, None, ReasonCode(PacketTypes.DISCONNECT, "Unspecified error"), None)
    assert "closed the connection before answering: [Errno 104] Connection reset by peer" in client.last_error
    assert "[broker.tls] is not set" in client.last_error


def test_a_client_certificate_the_broker_wants_or_refuses(tls_files):
    tls = tls_files["server_only"]
    alerts = {
        "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required": "set cert_file and key_file",
        "[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked": "revoked",
        "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca": "signed by another CA",
    }
    for alert, hint in alerts.items():
        client = make(tls=tls)
        client._on_pre_connect(None, None)
        client._on_log(None, None, paho.MQTT_LOG_ERR, f"failed to receive on socket: {alert}")
        client._on_disconnect(None, None, None, ReasonCode(PacketTypes.DISCONNECT, "Unspecified error"), None)
        assert alert in client.last_error and hint in client.last_error, client.last_error


def test_a_successful_connection_clears_the_error(caplog):
    client = make(username="box-1", password_file=Path(__file__))  # any readable file
    refuse(client, "Not authorized")

    class FakePaho:
        def socket(self):
            return None

        def subscribe(self, topics):
            return 0, 1

    with caplog.at_level(logging.INFO, "agent.mqtt"):
        client._on_connect(
            FakePaho(),
            None,
            SimpleNamespace(session_present=False),
            ReasonCode(PacketTypes.CONNACK, "Success"),
            None,
        )
    assert client.last_error is None and client.stats()["connect_failures"] == 0
    assert "after 1 failed attempts" in caplog.records[-1].getMessage()


def test_stopping_is_not_an_error():
    client = make()
    client._stopping = True
    fail_with(client, ConnectionRefusedError(111, "Connection refused"))
    client._on_disconnect(None, None, None, ReasonCode(PacketTypes.DISCONNECT, "Unspecified error"), None)
    assert client.last_error is None
