"""The fleet's MQTT namespace: ``fed/{fleet}/...``. Every federated topic name lives here.

| topic                          | from → to   | retained | payload                                         |
|--------------------------------|-------------|----------|-------------------------------------------------|
| ``round``                      | HQ → boxes  | yes      | ``RoundAnnouncement`` JSON                      |
| ``up/{device}``                | box → HQ    | no       | upload chunks (``agent.fed.wire`` frames)       |
| ``res/{device}``               | HQ → box    | no       | ``{"upload_id", "status", "round", "reason"?}`` |
| ``global``                     | HQ → boxes  | yes      | the signed manifest of the newest global        |
| ``global/chunk/{i}``           | HQ → boxes  | yes      | the global's chunks (frames)                    |
| ``hq/{worker}``                | HQ          | yes      | an aggregator worker's status (will: offline)   |
| ``bundle``                     | HQ → boxes  | yes      | the signed base-model release (``BundleRelease``) |
| ``bundle/req/{device}``        | box → HQ    | no       | chunks of a release file the box still needs    |
| ``bundle/data/{device}``       | HQ → box    | no       | those chunks (frames, like uploads)             |
| ``bundle/report/{device}``     | box → HQ    | no       | how the release goes on the box (``BundleReport``) |

Aggregator workers subscribe to ``up/+`` through the shared subscription
``$share/{group}/fed/{fleet}/up/+``, so the broker (or broker cluster) spreads uploads over them.
Device ids must be unique within a fleet: the ACL lets a box write only ``up/{its id}`` and read
only ``res/{its id}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.topics import SEGMENT_PATTERN

PREFIX = "fed"
_SEGMENT = re.compile(SEGMENT_PATTERN)


@dataclass(frozen=True)
class FleetTopics:
    fleet: str

    def __post_init__(self) -> None:
        if not _SEGMENT.match(self.fleet):
            raise ValueError(f"fleet {self.fleet!r} is not a valid topic level ({SEGMENT_PATTERN})")

    @property
    def base(self) -> str:
        return f"{PREFIX}/{self.fleet}/"

    @property
    def round(self) -> str:
        return self.base + "round"

    def upload(self, device: str) -> str:
        return self.base + f"up/{device}"

    @property
    def uploads(self) -> str:
        """Every box's upload topic (one level wildcard)."""
        return self.base + "up/+"

    def shared_uploads(self, group: str) -> str:
        """The uploads as an MQTT 5 shared subscription: each message goes to one worker of ``group``."""
        return self.shared(group, "up/+")

    def result(self, device: str) -> str:
        return self.base + f"res/{device}"

    @property
    def global_manifest(self) -> str:
        return self.base + "global"

    def global_chunk(self, index: int) -> str:
        return self.base + f"global/chunk/{index}"

    @property
    def global_chunks(self) -> str:
        return self.base + "global/chunk/+"

    @property
    def bundle(self) -> str:
        return self.base + "bundle"

    def bundle_request(self, device: str) -> str:
        return self.base + f"bundle/req/{device}"

    def bundle_data(self, device: str) -> str:
        return self.base + f"bundle/data/{device}"

    def bundle_report(self, device: str) -> str:
        return self.base + f"bundle/report/{device}"

    def shared(self, group: str, suffix: str) -> str:
        """``fed/{fleet}/{suffix}`` as a shared subscription of ``group`` (suffix may end in ``+``)."""
        if not _SEGMENT.match(group):
            raise ValueError(f"share group {group!r} is not a valid topic level")
        return f"$share/{group}/{self.base}{suffix}"

    def device_after(self, prefix: str, topic: str) -> str | None:
        """``fed/{fleet}/{prefix}/{device}`` -> device (a valid topic level), or None."""
        start = self.base + prefix + "/"
        if not topic.startswith(start):
            return None
        device = topic[len(start) :]
        return device if _SEGMENT.match(device) else None

    def worker_status(self, worker: str) -> str:
        return self.base + f"hq/{worker}"

    def device_of_upload(self, topic: str) -> str | None:
        """``fed/{fleet}/up/{device}`` -> device, or None for any other topic."""
        return self.device_after("up", topic)

    def is_fleet_topic(self, topic: str) -> bool:
        return topic.startswith(self.base)

    def box_subscriptions(self, device: str) -> dict[str, bool]:
        """What a box subscribes to, each with whether the broker should send its retained message."""
        return {
            self.round: True,
            self.global_manifest: True,
            self.global_chunks: True,
            self.result(device): False,
            self.bundle: True,
            self.bundle_data(device): False,
        }
