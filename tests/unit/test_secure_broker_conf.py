"""examples/mosquitto-secure.conf and examples/mosquitto.acl: the secured broker keeps the shipped
settings without forking them, and the ACL grants every topic the agent and the aggregator use,
in a box's own namespace only."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from agent.fed.topics import FleetTopics
from agent.mqtt import RESUME_MARKER_SUFFIX, SYS_DROPPED_TOPIC
from agent.topics import Topics
from tests.integration.mosquitto import (
    SECURE_CONF,
    SHIPPED_ACL,
    SHIPPED_CONF,
    SITE_KEYS,
    Mosquitto,
    conf_keys,
    configure,
    shipped_sections,
)

SHIPPED = SHIPPED_CONF.read_text()
SECURE = SECURE_CONF.read_text()
# Section 6 of the shipped file: the site's (listener, paths, logs, access), nothing edge-agent needs.
SITE_SECTION_KEYS = SITE_KEYS | {"log_type", "connection_messages", "log_timestamp_format", "allow_anonymous"}


def settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


def test_the_documented_sed_cut_is_sections_1_to_5():
    sed = shutil.which("sed")
    assert sed
    cut = subprocess.run(
        [sed, r"/^# ---- 6\./,$d", str(SHIPPED_CONF)], capture_output=True, text=True, check=True
    )
    assert cut.stdout == shipped_sections(SHIPPED)
    assert "sed '/^# ---- 6\\./,$d' examples/mosquitto.conf" in SECURE, "the command the file documents"
    kept = conf_keys(cut.stdout)
    assert kept >= {
        "persistence",
        "max_queued_messages",
        "max_queued_bytes",
        "max_packet_size",
        "sys_interval",
    }
    # Everything cut off is the site's: no setting edge-agent relies on is lost.
    assert conf_keys(SHIPPED) - kept <= SITE_SECTION_KEYS
    assert not kept & SITE_SECTION_KEYS


def test_the_secure_file_is_only_the_site_part():
    keys = conf_keys(SECURE)
    # It forks nothing of sections 1-5, and sets no path the distribution's main file sets.
    assert not keys & conf_keys(shipped_sections(SHIPPED))
    assert not keys & {"persistence_location", "log_dest", "include_dir", "per_listener_settings"}
    s = settings(SECURE)
    assert s["allow_anonymous"] == ["false"] and s["listener"] == ["8883"]
    assert s["use_username_as_clientid"] == ["true"], "against session takeover by client id"
    assert {"cafile", "certfile", "keyfile", "password_file", "acl_file"} <= keys
    # The mutual-TLS switches are there to turn on, and crlfile to uncomment.
    assert s["require_certificate"] == ["false"] and s["use_identity_as_username"] == ["false"]
    assert "#crlfile " in SECURE


def test_the_include_hook_of_the_shipped_file_is_off_until_named():
    assert "include_dir" not in conf_keys(SHIPPED), "mosquitto refuses a directory that does not exist"
    assert "#include_dir /etc/mosquitto/edge-agent.d" in SHIPPED
    on = configure(SHIPPED, {"include_dir": "/x"})
    assert settings(on)["include_dir"] == ["/x"]


def test_configure_replaces_switches_on_and_removes():
    text = "a 1\n#b 2\n# c is a comment\nd 4\n"
    assert configure(text, {"a": "9", "b": "8", "d": None}) == "a 9\nb 8\n# c is a comment\n"
    with pytest.raises(AssertionError, match="not in the config"):
        configure(text, {"c": "1"})


@pytest.mark.parametrize("layout", ["conf.d", "main"])
def test_the_secured_test_broker_keeps_every_shipped_setting(layout, tmp_path):
    broker = Mosquitto.secured(tmp_path, {"box-1": "pw"}, layout=layout)
    broker.write_conf()
    files = [broker.conf_path, *sorted((tmp_path / "conf.d").glob("*.conf"))]
    effective = settings("\n".join(f.read_text() for f in files))
    for key, values in settings(shipped_sections(SHIPPED)).items():
        assert effective[key] == values, key
    assert effective["allow_anonymous"] == ["false"]
    assert effective["listener"] == [f"{broker.port} {broker.host}"], "one listener, the TLS one"
    assert effective["persistence_location"] == [f"{tmp_path}/"]
    assert len(effective["include_dir"]) == 1


# ---- the ACL ----------------------------------------------------------------------------------


def acl_rules(text: str) -> dict[str | None, list[tuple[str, str]]]:
    """user (None: the patterns, which apply to everyone) -> [(access, topic)]."""
    rules: dict[str | None, list[tuple[str, str]]] = {None: []}
    user = None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
            rules[user] = []
        elif words[0] == "pattern":
            rules[None].append((words[1], words[2]) if len(words) == 3 else ("readwrite", words[1]))
        else:
            assert words[0] == "topic", line
            rules[user].append((words[1], words[2]) if len(words) == 3 else ("readwrite", words[1]))
    return rules


RULES = acl_rules(SHIPPED_ACL.read_text())


def allowed(user: str, topic: str, access: str) -> bool:
    """mosquitto's default ACL check, for topics without wildcards."""
    grants = [(a, t.replace("%u", user)) for a, t in RULES[None]] + RULES.get(user, [])
    return any(a in (access, "readwrite") and topic_matches_sub(t, topic) for a, t in grants)


def box_topics(site: str, device: str, fleet: str) -> tuple[list[str], list[str]]:
    """What edge-agent on a box reads and writes."""
    t = Topics(site, device)
    f = FleetTopics(fleet)
    reads = [*t.inbound(), t.topic(RESUME_MARKER_SUFFIX), SYS_DROPPED_TOPIC, f.round, f.global_manifest]
    reads += [f.global_chunk(0), f.global_chunk(17), f.result(device), f.bundle, f.bundle_data(device)]
    writes = [
        t.infer_res,
        t.predictions,
        t.config_state,
        t.cmd_res,
        t.telemetry,
        t.status,
        t.learner,
        t.sync,
        t.topic("events/res"),
        t.topic("samples/res"),
        t.topic("feedback/res"),
        t.topic("infer/res/my-requester"),  # a response topic inside the namespace
        t.topic(RESUME_MARKER_SUFFIX),
        f.upload(device),
        f.bundle_request(device),
        f.bundle_report(device),
    ]
    return reads, writes


def test_the_acl_grants_a_box_everything_the_agent_uses():
    reads, writes = box_topics("plant-a", "line3-box1", "plant-fleet")
    for topic in reads:
        assert allowed("line3-box1", topic, "read"), topic
    for topic in writes:
        assert allowed("line3-box1", topic, "write"), topic


def test_the_acl_grants_a_box_nothing_of_another_box():
    reads, writes = box_topics("plant-a", "line3-box2", "plant-fleet")
    shared = {SYS_DROPPED_TOPIC, *(t for t in reads if "/res/" not in t and t.startswith("fed/"))}
    for topic in set(reads) - shared:
        assert not allowed("line3-box1", topic, "read"), topic
    for topic in writes:
        assert not allowed("line3-box1", topic, "write"), topic
    f = FleetTopics("plant-fleet")
    for topic in (
        f.round,
        f.global_manifest,
        f.global_chunk(0),
        f.worker_status("hq-1"),
        f.upload("line3-box2"),
        f.bundle,
        f.bundle_data("line3-box2"),
    ):
        assert not allowed("line3-box1", topic, "write"), topic
    assert not allowed("line3-box1", f.upload("line3-box2"), "read")
    assert not allowed("line3-box1", f.bundle_data("line3-box2"), "read")
    assert not allowed("line3-box1", f.bundle_request("line3-box2"), "write")


def test_the_acl_grants_the_aggregator_what_it_uses():
    f = FleetTopics("plant-fleet")
    status = f.worker_status("hq-1")
    marker = f"{status.rpartition('/')[0]}/{RESUME_MARKER_SUFFIX}"  # MqttClient's marker beside the will
    for topic in (
        f.upload("line3-box1"),
        marker,
        SYS_DROPPED_TOPIC,
        f.bundle_request("b"),
        f.bundle_report("b"),
    ):
        assert allowed("aggregator", topic, "read"), topic
    for topic in (
        f.round,
        f.global_manifest,
        f.global_chunk(3),
        f.result("line3-box1"),
        status,
        marker,
        f.bundle,
        f.bundle_data("b"),
    ):
        assert allowed("aggregator", topic, "write"), topic
    assert not allowed("aggregator", "edge/plant-a/line3-box1/config", "write")


def test_operators_and_the_example_producer():
    assert allowed("operator", "edge/plant-a/line3-box1/config", "write")
    assert allowed("operator", "edge/plant-b/x/telemetry", "read")
    assert allowed("operator", "$SYS/broker/clients/connected", "read")
    assert not allowed("operator", "fed/plant-fleet/global", "write")
    assert allowed("plant-a-gateway", "edge/plant-a/line3-box1/samples", "write")
    assert allowed("plant-a-gateway", "edge/plant-a/line3-box1/samples/res", "read")
    assert not allowed("plant-a-gateway", "edge/plant-b/line3-box1/samples", "write")
    assert not allowed("plant-a-gateway", "edge/plant-a/line3-box1/config", "write")


def test_readme_documents_the_files():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Securing the broker") :]
    for name in (
        "examples/mosquitto-secure.conf",
        "examples/mosquitto.acl",
        "edge-agent certs",
        "mosquitto_passwd",
    ):
        assert name in section, name
