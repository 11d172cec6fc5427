"""The shipped examples/mosquitto.conf says what the agent and its README rely on, and the test
broker helper derives from it without losing any of it."""

from __future__ import annotations

import re
from pathlib import Path

from agent.config import BrokerConfig
from agent.messages import MAX_PAYLOAD_BYTES
from agent.mqtt import SHIPPED_BROKER_QUEUE
from tests.integration.mosquitto import SHIPPED_CONF, SITE_KEYS, conf_keys, derive_conf

ROOT = Path(__file__).resolve().parents[2]
DURATION_S = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}


def settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


SHIPPED = settings(SHIPPED_CONF.read_text())


def one(key: str) -> str:
    [value] = SHIPPED[key]
    return value


def test_queue_limits_are_the_ones_the_agent_reports():
    assert int(one("max_queued_messages")) == SHIPPED_BROKER_QUEUE.max_queued_messages
    assert int(one("max_queued_bytes")) == SHIPPED_BROKER_QUEUE.max_queued_bytes
    # the comment's arithmetic: R * T and R * T * B
    assert SHIPPED_BROKER_QUEUE.max_queued_messages == 100 * 3600
    assert SHIPPED_BROKER_QUEUE.max_queued_bytes == 100 * 3600 * 1024
    assert "1 hour at 100 messages/s" in SHIPPED_CONF.read_text()


def test_persistence_and_session_outlive_the_agents_session():
    assert one("persistence") == "true"
    assert 0 < int(one("autosave_interval")) <= 300
    m = re.fullmatch(r"(\d+)([hdwmy])", one("persistent_client_expiration"))
    assert m, "mosquitto's duration syntax"
    expiration_s = int(m.group(1)) * DURATION_S[m.group(2)]
    session_s = BrokerConfig.model_fields["session_expiry_s"].default
    assert expiration_s > session_s


def test_packet_limit_is_above_every_payload_the_agent_accepts():
    assert "message_size_limit" not in SHIPPED, "acks and drops oversized messages from MQTT 3.1.1 devices"
    limit = int(one("max_packet_size"))
    assert limit >= 2 * max(MAX_PAYLOAD_BYTES.values())
    assert limit >= 256 * 1024 + 64 * 1024, "a chunked federated upload with its topic and properties"


def test_listener_is_the_one_the_example_agent_config_uses():
    assert one("listener") == "1884 127.0.0.1"
    assert "port = 1884" in (ROOT / "examples" / "edge-agent.toml").read_text()


def test_derived_test_config_keeps_everything_but_the_site():
    site = "persistence_location /tmp/x/\nlog_dest file /tmp/x/log\nuser me\nlistener 5555 127.0.0.1"
    derived = settings(derive_conf(SHIPPED_CONF.read_text(), site))
    for key, values in SHIPPED.items():
        if key not in SITE_KEYS:
            assert derived[key] == values, key
    assert derived["listener"] == ["5555 127.0.0.1"] and derived["persistence_location"] == ["/tmp/x/"]


def test_derived_config_changes_removes_and_replaces_settings():
    site = "listener 5555 127.0.0.1"
    text = derive_conf(
        SHIPPED_CONF.read_text(),
        site,
        {"max_queued_messages": None, "max_queued_bytes": None, "sys_interval": "1"},
        extra_conf="allow_anonymous false\npassword_file /p\n",
    )
    derived = settings(text)
    assert "max_queued_messages" not in derived and "max_queued_bytes" not in derived
    assert derived["sys_interval"] == ["1"]
    assert derived["allow_anonymous"] == ["false"], "extra_conf replaces, never duplicates"
    # listener options (TLS files) must follow the listener line
    assert text.index("listener 5555") < text.index("password_file /p")
    assert conf_keys(text) >= {"persistence", "max_packet_size", "persistent_client_expiration"}
