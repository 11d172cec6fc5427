"""Flood guards: the infer/req token bucket (a burst of one second's worth, then the rate) and the log throttle."""

import time

from agent.daemon.inference import TokenBucket


def test_burst_then_rate():
    b = TokenBucket()
    assert sum(b.take(10) for _ in range(100)) == 10  # the burst
    time.sleep(0.25)
    assert 1 <= sum(b.take(10) for _ in range(100)) <= 4  # ~2.5 tokens came back
    assert sum(b.take(1000) for _ in range(2000)) >= 1000  # a new rate: full again


def test_a_rate_below_one_still_lets_one_through():
    b = TokenBucket()
    assert b.take(0.5) is True and b.take(0.5) is False


def test_log_throttle_keeps_a_sample_and_says_how_many_it_held_back(caplog):
    import logging

    from agent.health import LogThrottle

    t = LogThrottle(burst=3, window_s=0.2)
    log = logging.getLogger("throttle-test")
    with caplog.at_level(logging.WARNING, logger="throttle-test"):
        for i in range(50):
            t.log(log, logging.WARNING, "samples:invalid_json", "rejected %d", i)
        t.log(log, logging.WARNING, "other", "another kind")
        time.sleep(0.25)
        t.log(log, logging.WARNING, "samples:invalid_json", "rejected %d", 99)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:4] == ["rejected 0", "rejected 1", "rejected 2", "another kind"]
    assert "47 more like the next (samples:invalid_json)" in lines[4] and lines[5] == "rejected 99"


def test_rejections_go_at_qos_0_so_a_flood_cannot_fill_the_qos_1_queue():
    # Found by the chaos fuzz: 100,000 bad messages queued 20,000 QoS 1 error replies and paho
    # dropped the answers to good requests with them.
    from agent.daemon.replies import Replier
    from agent.health import Counters
    from agent.messages import ErrorCode, MessageError
    from agent.mqtt import InboundMessage
    from agent.topics import Kind, Topics

    class Recorder:
        connected = True

        def __init__(self):
            self.sent, self.acked = [], []

        def publish(self, topic, payload, *, retain=False, correlation_data=None, qos=1):
            self.sent.append((topic, qos))

        def ack(self, msg):
            self.acked.append(msg.mid)

    t = Recorder()
    r = Replier(t, Topics("s", "d"), Counters())
    msg = InboundMessage("edge/s/d/samples", b"{", 1, False, 7)
    r.reject(Kind.SAMPLE, msg, MessageError(ErrorCode.INVALID_JSON, "not JSON"))
    r.reply(Kind.INFER, msg, {"id": "r1", "predictions": []})
    assert t.sent == [("edge/s/d/samples/res", 0), ("edge/s/d/infer/res", 1)] and t.acked == [7]
