"""Synthetic factory text streams for tests, benchmarks and fleet demos.

A `PlantStream` produces what an edge box hears from one site: equipment log lines, alarm texts,
operator work-order notes and `key=value` sensor lines, labeled with the default label set in
`models/plant-faults.json`. Streams are deterministic for a seed and pure Python + numpy.

The data is built to be learnable but not trivially separable, following what RESEARCH.md measured
on real maintenance text: mostly short texts with a long tail, about 18 % verbatim repeats, typos and
abbreviations in notes, symptoms shared by two fault classes, and sensor lines whose label follows
from a value crossing a threshold rather than from a word. Sites differ in label mix and equipment
vocabulary (non-IID), and a drift event switches to a new alarm vocabulary, new failure phrasings
and renamed sensor keys, so a model trained before the drift measurably loses accuracy after it.

CLI: `python -m tools.simulate --site site0 --device d1 --count 100 --dry-run` (see `--help`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LABELS",
    "LABELS_PATH",
    "LabeledText",
    "SiteProfile",
    "PlantStream",
    "DryRunPublisher",
    "MqttSamplePublisher",
    "default_sites",
    "site_profile",
    "labeled_dataset",
    "stream_texts",
    "load_labels",
    "sample_payload",
    "samples_topic",
    "events_topic",
    "check_topic_level",
    "main",
]

log = logging.getLogger(__name__)

LABELS_PATH = Path(__file__).resolve().parents[1] / "models" / "plant-faults.json"

# sysexits.h codes, so a supervisor can tell bad input from an unreachable broker.
EXIT_BAD_INPUT = 65
EXIT_BROKER_UNAVAILABLE = 69


def load_labels(path: Path = LABELS_PATH) -> list[str]:
    """Label names from a label-set JSON file (`{"labels": [...]}`)."""
    with open(path, encoding="utf-8") as f:
        labels = json.load(f)["labels"]
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"{path}: 'labels' must be a non-empty list of distinct names")
    return list(labels)


LABELS: tuple[str, ...] = tuple(load_labels())


@dataclass(frozen=True)
class LabeledText:
    """One record as a device would send it, with its true (or noised) label."""

    text: str
    label: str
    site: str
    ts: float  # seconds since stream start (monotone within a stream)
    drifted: bool  # True when produced under a drift event


@dataclass(frozen=True)
class SiteProfile:
    """What makes a site's stream its own: label mix and equipment/phrasing family."""

    name: str
    label_weights: dict[str, float]  # non-IID label mix per site
    vocab_variant: int  # which equipment names / phrasing family the site uses


# --------------------------------------------------------------------------------------------
# Phrase banks. A symptom is (log phrase, alarm title, operator note); `{slot}` fields are filled
# with varying numbers and ids by `_fill`.
# --------------------------------------------------------------------------------------------

_Symptom = tuple[str, str, str]

_SYMPTOMS: dict[str, tuple[_Symptom, ...]] = {
    "normal": (
        ("cycle complete part count {count}", "Operator stop requested", "routine check done"),
        ("batch {code4} started recipe {recipe}", "Recipe changed", "changeover to sku {code4} done"),
        ("mode changed to AUTO", "Door open", "cleaned machine end of shift"),
        ("production order {wo} finished", "Material low infeed", "no issues this shift"),
        ("tool change complete T{n}", "Shift change", "lubricated per pm plan"),
        ("pressure {bar_ok} bar within limits", "Maintenance mode active", "pm done, greased all points"),
        ("temperature {temp_ok}C nominal", "Safety gate opened by operator", "test run after changeover"),
        ("line speed {ppm} ppm", "Infeed empty waiting for material", "replaced filter per pm schedule"),
        ("heartbeat ok uptime {count}s", "Outfeed full", "checked belts and chains"),
        ("warmup finished, ready", "Manual mode selected", "calibrated scale per plan"),
    ),
    "electrical": (
        ("motor current {amps}A above limit", "Motor overload", "motor tripping on overload"),
        ("breaker Q{n} tripped", "Circuit breaker tripped", "breaker Q{n} tripped again"),
        (
            "drive fault undervoltage DC bus {volts}V",
            "Drive undervoltage",
            "drive keeps faulting undervoltage",
        ),
        ("24V supply dropout on IO rack {n}", "24V supply fault", "24v supply dropping out, io rack resets"),
        ("phase loss detected on main feed", "Phase loss", "lost a phase on the main feed"),
        ("contactor K{n} feedback missing", "Contactor feedback error", "contactor K{n} chattering"),
        ("insulation resistance low on winding", "Insulation fault", "megger test low on motor winding"),
        ("fuse F{n} blown", "Fuse blown", "blown fuse F{n} in cabinet"),
    ),
    "mechanical": (
        ("bearing noise vibration {vib}mm/s", "Bearing vibration high", "noisy bearing, grinding sound"),
        ("belt slip detected speed deviation {pct}%", "Belt slip", "worn belt slipping"),
        ("chain tension low", "Chain tension fault", "chain loose and jumping"),
        ("gearbox noise increasing", "Gearbox noise", "gearbox whining under load"),
        ("jam detected at infeed", "Jam infeed", "jam at infeed, guide rail bent"),
        ("coupling misalignment detected", "Coupling misalignment", "coupling worn, motor misaligned"),
        ("axis following error {count} increments", "Axis following error", "axis sluggish, rails dry"),
        ("roller seized", "Roller seized", "seized roller on conveyor"),
    ),
    "hydraulic": (
        ("hydraulic pressure low {bar_low} bar", "Hydraulic pressure low", "hyd pressure dropping"),
        ("oil level low in tank", "Oil level low", "oil level low in tank"),
        ("oil leak at cylinder {n}", "Cylinder leak", "cylinder seal leaking oil"),
        ("hydraulic filter differential pressure high", "Filter clogged", "hydraulic filter clogged"),
        ("proportional valve response slow", "Valve response slow", "prop valve sticking"),
        ("pump pressure unstable", "Pump pressure unstable", "pump whining, air in the oil"),
        ("hose leak at fitting", "Hose leak", "hydraulic hose leaking at fitting"),
    ),
    "pneumatic": (
        ("air pressure low {air_low} bar", "Air pressure low", "low air pressure at station"),
        ("compressed air leak at fitting", "Air leak", "air leak hissing at fitting"),
        ("cylinder end position not reached", "Cylinder end position", "cylinder not reaching end pos"),
        ("solenoid valve Y{n} not switching", "Valve terminal fault", "solenoid valve Y{n} stuck"),
        ("vacuum not reached at gripper", "Vacuum fault", "suction cups worn, no vacuum"),
        ("compressor dryer alarm", "Compressor fault", "water in the air lines"),
        ("air consumption high", "Air flow high", "air hose cracked, losing air"),
    ),
    "thermal": (
        ("temperature high {temp_high}C", "Overtemperature", "running hot, {temp_high}C on display"),
        ("cooling fan failure", "Cooling fan fault", "cabinet fan dead"),
        ("oil temperature high {temp_high}C", "Oil temperature high", "oil getting hot, cooler dirty"),
        ("zone {n} overtemp setpoint exceeded", "Zone overtemperature", "zone {n} overshooting setpoint"),
        ("coolant temperature high", "Coolant temperature high", "coolant too warm, chiller low on gas"),
        ("heater not reaching setpoint", "Heating time exceeded", "heater band burnt out"),
        (
            "cabinet temperature high {temp_high}C",
            "Cabinet overtemperature",
            "cabinet too hot, filter mat blocked",
        ),
    ),
    "sensor_fault": (
        ("sensor signal lost on TT{nn}", "Wire break", "sensor cable broken"),
        ("analog input {n} out of range", "Analog input out of range", "reading out of range, wiring loose"),
        ("proximity switch B{nn} not switching", "Proximity switch fault", "prox switch not detecting"),
        ("light barrier blocked permanently", "Light barrier dirty", "photo eye dirty"),
        ("temperature reading frozen at {temp_ok}C", "Value frozen", "temp display stuck on one value"),
        ("encoder count mismatch", "Encoder fault", "encoder giving wrong counts"),
        ("pressure transmitter reads {weird}", "Transmitter fault", "pressure transmitter reads {weird}"),
    ),
    "quality": (
        ("part dimension out of tolerance {mm}mm", "Dimension out of tolerance", "parts out of tolerance"),
        ("reject rate {pct}% above target", "Reject rate high", "lots of rejects this shift"),
        ("fill weight low {grams}g", "Fill weight low", "underfilled bottles"),
        ("label position error", "Label position error", "labels crooked"),
        ("surface scratches detected by camera", "Surface defect", "scratches on parts"),
        ("leak test failed batch {code4}", "Leak test failed", "leak test fails on batch {code4}"),
        ("color deviation delta E {mm}", "Color deviation", "colour off on last batch"),
    ),
}

# Failure patterns that only appear after a drift event: words a pre-drift model has never seen.
_DRIFT_SYMPTOMS: dict[str, tuple[_Symptom, ...]] = {
    "normal": (
        (
            "edge gateway sync done",
            "Firmware handshake complete",
            "new hmi screens, walked shift through them",
        ),
        ("oee snapshot {pct}% published", "Energy saving standby", "energy audit walkthrough"),
    ),
    "electrical": (
        ("VFD reports earth leakage {amps}mA", "Earth leakage", "vfd earth leakage, cable chafed"),
        ("harmonic distortion THD {pct}% on feeder", "Harmonics high", "capacitor bank bulging, thd high"),
        ("servo amplifier short circuit", "Servo amplifier fault", "servo amp burnt, smell of ozone"),
    ),
    "mechanical": (
        ("gearbox backlash exceeds tolerance", "Backlash excessive", "backlash in gearbox, shimmed"),
        ("sprocket teeth worn", "Sprocket wear", "sprocket teeth hooked, swapped sprocket"),
        ("keyway sheared on drive shaft", "Shaft keyway sheared", "sheared key on shaft"),
    ),
    "hydraulic": (
        ("pump cavitation detected", "Pump cavitation", "pump cavitating, suction strainer"),
        (
            "accumulator precharge lost",
            "Accumulator precharge",
            "accumulator bladder flat, recharged nitrogen",
        ),
        ("hose burst on ram", "Hose burst", "ram hose burst, sprayed everywhere"),
    ),
    "pneumatic": (
        ("regulator creep {air_low} bar", "Regulator creep", "regulator creeping, diaphragm torn"),
        ("condensate drain blocked", "Condensate drain", "frl bowl full of condensate"),
        ("vacuum ejector venturi clogged", "Ejector clogged", "venturi ejector clogged, muffler black"),
    ),
    "thermal": (
        ("heat exchanger fouled delta {temp_ok}K", "Exchanger fouled", "heat exchanger fouled, scaling"),
        ("thermal runaway suspected", "Thermal runaway", "thermal runaway on zone, refractory glowing"),
        ("radiator airflow blocked", "Radiator blocked", "radiator clogged with lint"),
    ),
    "sensor_fault": (
        ("4-20mA loop below 3.6mA on AI{n}", "Loop current low", "loop current below 3.6 ma, io-link lost"),
        ("IO-Link device lost port {n}", "IO-Link device lost", "io-link master lost device"),
        ("PT100 open circuit", "PT100 open circuit", "pt100 open, calibration drift before"),
    ),
    "quality": (
        ("burrs on edges detected", "Burr detected", "burrs on edges, deburring missed"),
        ("porosity in casting {pct}%", "Porosity detected", "porosity in castings, customer claim"),
        ("delamination on laminate", "Delamination", "laminate delaminating, warpage too"),
    ),
}

# Symptoms that two or three classes share: the words alone cannot decide, so accuracy stays below
# 100 % for any model, as on real work orders ("motor overheating" may be electrical or thermal).
_SHARED_SYMPTOMS: tuple[tuple[_Symptom, tuple[str, ...]], ...] = (
    (
        ("motor overheating", "Motor overtemperature", "motor running hot, smells burnt"),
        ("thermal", "electrical"),
    ),
    (
        ("clamp pressure dropping", "Clamp pressure low", "clamp cylinder losing pressure"),
        ("hydraulic", "pneumatic"),
    ),
    (
        ("vibration reading high {vib}mm/s", "Vibration high", "vibration alarm again"),
        ("mechanical", "sensor_fault"),
    ),
    (
        ("reject rate up after tool change", "Reject rate increasing", "more rejects since tool change"),
        ("quality", "mechanical"),
    ),
    (
        ("temperature reading erratic", "Temperature deviation", "temp jumping around"),
        ("sensor_fault", "thermal"),
    ),
    (
        ("unexpected stop, no fault message", "Machine stopped", "machine just stops, no alarm"),
        ("electrical", "mechanical", "normal"),
    ),
    (
        ("unusual noise from unit", "Noise detected", "strange noise from unit"),
        ("mechanical", "hydraulic", "pneumatic"),
    ),
    (
        ("pressure fluctuating", "Pressure deviation", "pressure going up and down"),
        ("hydraulic", "pneumatic", "sensor_fault"),
    ),
)

_ACTIONS: dict[str, tuple[str, ...]] = {
    "normal": (
        "all ok",
        "no findings",
        "nothing to report",
        "running fine",
        "good to go",
        "back in production",
    ),
    "electrical": (
        "reset breaker",
        "replaced fuse",
        "called electrician",
        "tightened terminals",
        "checked wiring with multimeter",
        "swapped drive",
    ),
    "mechanical": (
        "replaced bearing",
        "retensioned chain",
        "replaced worn belt",
        "realigned motor",
        "greased bearings",
        "cleared jam and straightened guide",
    ),
    "hydraulic": (
        "topped up oil",
        "replaced seals",
        "changed filter",
        "tightened fitting",
        "bled the system",
        "cleaned valve",
    ),
    "pneumatic": (
        "replaced fitting",
        "replaced solenoid valve",
        "drained water separator",
        "adjusted cushion",
        "replaced suction cups",
        "fixed air hose",
    ),
    "thermal": (
        "replaced fan",
        "cleaned cooler",
        "let it cool down",
        "cleaned filter mat",
        "replaced heater band",
        "refilled coolant",
    ),
    "sensor_fault": (
        "replaced sensor",
        "cleaned sensor",
        "realigned sensor",
        "rewired connector",
        "recalibrated transmitter",
        "replaced cable",
    ),
    "quality": (
        "adjusted offset",
        "quarantined batch",
        "informed quality",
        "100% check on lot",
        "adjusted labeler",
        "sorted parts",
    ),
}

_FOLLOWUPS = (
    "informed shift lead",
    "WO {wo} opened",
    "spare part ordered",
    "monitor next shift",
    "running again",
    "see WO {wo}",
    "ok for now",
    "need to recheck tomorrow",
    "parts on order, eta 2 days",
    "handed over to night shift",
)

# Equipment per phrasing family: (name in logs and notes, station id in sensor lines, labels it
# plausibly shows). Normal and sensor_fault records may come from any machine.
_Machine = tuple[str, str, frozenset[str]]


def _machines(*rows: tuple[str, str, str]) -> tuple[_Machine, ...]:
    return tuple((name, station, frozenset(labels.split())) for name, station, labels in rows)


_MACHINES: tuple[tuple[_Machine, ...], ...] = (
    _machines(  # 0: press and body shop
        ("press P{n}", "press{n}", "hydraulic mechanical thermal electrical quality"),
        ("HPU-{nn}", "hpu{n}", "hydraulic thermal electrical"),
        ("conveyor C{n}", "conv{n}", "mechanical electrical thermal"),
        ("clamp station CS{n}", "cs{n}", "pneumatic hydraulic quality"),
        ("robot R{n}", "robot{n}", "electrical mechanical pneumatic"),
        ("oven O{n}", "oven{n}", "thermal electrical quality"),
        ("weld cell W{n}", "weld{n}", "electrical thermal quality pneumatic"),
        ("compressor K{n}", "comp{n}", "pneumatic thermal mechanical electrical"),
    ),
    _machines(  # 1: packaging hall
        ("filler F{n}", "filler{n}", "pneumatic quality mechanical electrical"),
        ("capper {n}", "capper{n}", "mechanical pneumatic quality"),
        ("labeler L{n}", "labeler{n}", "mechanical quality electrical"),
        ("packer {n}", "packer{n}", "mechanical pneumatic electrical"),
        ("palletizer PZ{n}", "pz{n}", "mechanical hydraulic electrical"),
        ("shrink tunnel ST{n}", "st{n}", "thermal electrical quality"),
        ("glue unit GU{n}", "gu{n}", "thermal pneumatic quality"),
        ("vacuum pump VP{n}", "vp{n}", "pneumatic mechanical thermal"),
        ("baler B{n}", "baler{n}", "hydraulic mechanical"),
    ),
    _machines(  # 2: machining
        ("CNC{nn}", "cnc{nn}", "electrical mechanical thermal hydraulic quality"),
        ("lathe T{n}", "lathe{n}", "mechanical thermal quality electrical"),
        ("mill M{n}", "mill{n}", "mechanical thermal quality electrical"),
        ("spindle S{n}", "spindle{n}", "mechanical thermal electrical"),
        ("coolant pump CLP{n}", "clp{n}", "hydraulic thermal electrical"),
        ("chiller CH{n}", "chiller{n}", "thermal electrical"),
        ("hyd unit HU{n}", "hu{n}", "hydraulic thermal"),
        ("tool changer TC{n}", "tc{n}", "pneumatic mechanical"),
        ("CMM{n}", "cmm{n}", "quality"),
    ),
)
N_VOCAB_VARIANTS = len(_MACHINES)

# Alarm tag prefixes follow the plant's tagging scheme, so they correlate with the fault domain.
_TAG_PREFIXES: dict[str, tuple[str, ...]] = {
    "normal": ("G", "D", "OP"),
    "electrical": ("Q", "M", "E"),
    "mechanical": ("CV", "M", "GB"),
    "hydraulic": ("HP", "HV", "HU"),
    "pneumatic": ("PN", "AV", "Y"),
    "thermal": ("TZ", "FAN", "TC"),
    "sensor_fault": ("TT", "PT", "B"),
    "quality": ("QC", "QG", "CAM"),
}

# Sensor lines: quantity -> key per variant, and the key a firmware update renames it to.
_QUANTITIES = ("temp", "vib", "hyd", "air", "current", "reject")
_SENSOR_KEYS: tuple[dict[str, str], ...] = (
    {
        "temp": "temp_c",
        "vib": "vib_mm_s",
        "hyd": "pressure_bar",
        "air": "air_bar",
        "current": "current_a",
        "reject": "reject_pct",
    },
    {
        "temp": "motor_temp",
        "vib": "vib_rms",
        "hyd": "hyd_p",
        "air": "air_p",
        "current": "motor_amps",
        "reject": "rej_rate",
    },
    {
        "temp": "spindle_temp",
        "vib": "vib_mms",
        "hyd": "clamp_bar",
        "air": "air_supply_bar",
        "current": "spindle_load_a",
        "reject": "scrap_pct",
    },
)
_DRIFT_SENSOR_KEYS: tuple[dict[str, str], ...] = (
    {
        "temp": "tmp_motor",
        "vib": "vib_velo",
        "hyd": "p_hyd",
        "air": "p_air",
        "current": "i_mot",
        "reject": "nok_pct",
    },
    {
        "temp": "tmp_mot_degc",
        "vib": "vibr_velo",
        "hyd": "p_oil",
        "air": "p_pneu",
        "current": "i_motor",
        "reject": "nok_rate",
    },
    {
        "temp": "tmp_spdl",
        "vib": "accel_rms",
        "hyd": "p_clamp",
        "air": "p_supply",
        "current": "i_spdl",
        "reject": "nok_share",
    },
)
# (low, high, decimals) of a healthy reading, and of a reading past the alarm threshold.
_NORMAL_RANGE = {
    "temp": (35, 78, 1),
    "vib": (0.4, 4.5, 1),
    "hyd": (150, 210, 0),
    "air": (5.6, 7.2, 2),
    "current": (3.0, 12.5, 1),
    "reject": (0.0, 1.8, 2),
}
_FAULT_RANGE = {
    "temp": (92, 135, 1),
    "vib": (7.1, 16.0, 1),
    "hyd": (45, 110, 0),
    "air": (2.0, 4.6, 2),
    "current": (15.0, 32.0, 1),
    "reject": (3.5, 14.0, 2),
}
_FAULT_QUANTITY = {
    "thermal": "temp",
    "mechanical": "vib",
    "hydraulic": "hyd",
    "pneumatic": "air",
    "electrical": "current",
    "quality": "reject",
}
# What a broken transmitter reports: overflow, wire-break substitutes, physically impossible values.
_BROKEN_READINGS = ("nan", "NaN", "-999.0", "6553.5", "-1", "0.0", "32767")

# Operators abbreviate; how much depends on the site's culture (phrasing family).
_ABBREVIATIONS: dict[str, tuple[str, ...]] = {
    "replaced": ("repl", "rplcd"),
    "bearing": ("brg",),
    "bearings": ("brgs",),
    "pressure": ("press", "pres"),
    "temperature": ("temp",),
    "motor": ("mtr",),
    "checked": ("chkd", "chk"),
    "check": ("chk",),
    "hydraulic": ("hyd",),
    "pneumatic": ("pneu",),
    "cylinder": ("cyl",),
    "maintenance": ("maint",),
    "operator": ("op",),
    "with": ("w/",),
    "without": ("w/o",),
    "leaking": ("lkg", "leakin"),
    "vibration": ("vib",),
    "electrician": ("sparky", "elec"),
    "position": ("pos",),
    "station": ("stn",),
    "changed": ("chgd",),
    "change": ("chg",),
    "switch": ("sw",),
    "valve": ("vlv",),
    "conveyor": ("conv",),
    "tolerance": ("tol",),
    "tomorrow": ("tmrw",),
    "again": ("agn",),
    "cabinet": ("cab",),
    "and": ("&", "+"),
    "the": ("",),
    "sensor": ("sens",),
    "connector": ("conn",),
    "adjusted": ("adj",),
}
_ABBREVIATION_RATE = (0.15, 0.55, 0.3)
_TYPO_RATE = (0.25, 0.4, 0.2)
_SHOUTING_RATE = (0.02, 0.3, 0.05)

# Firmware-update alarm mnemonics: each title word maps to a short upper-case code.
_MNEMONICS = {
    "pressure": "PRS",
    "low": "LO",
    "high": "HI",
    "motor": "MTR",
    "overload": "OVLD",
    "temperature": "TMP",
    "hydraulic": "HYD",
    "air": "AIR",
    "oil": "OIL",
    "level": "LVL",
    "fault": "FLT",
    "leak": "LK",
    "vibration": "VIB",
    "bearing": "BRG",
    "circuit": "CCT",
    "breaker": "BRK",
    "tripped": "TRP",
    "sensor": "SNS",
    "value": "VAL",
    "frozen": "FRZ",
    "valve": "VLV",
    "cylinder": "CYL",
    "rate": "RT",
    "reject": "REJ",
    "overtemperature": "OVTMP",
    "supply": "SUP",
    "drive": "DRV",
    "filter": "FLTR",
}

_LOG_LEVELS = (("INFO", "WARN", "ERROR"), ("I", "W", "E"), ("I", "W", "E"))
_KIND_WEIGHTS = {"alarm": 0.28, "note": 0.34, "log": 0.22, "sensor": 0.16}
_SHARED_SYMPTOM_RATE = 0.14
_DRIFT_SYMPTOM_RATE = 0.6  # share of post-drift fault records told in the new words
_STREAM_EPOCH = dt.datetime(2026, 11, 25, 6, 0, 0)
_MEAN_GAP_S = 3.0
_REPEAT_WINDOW = 2000  # operators re-send recent texts, not ones from last year
_KINDS_THAT_REPEAT = ("alarm", "note")  # logs and sensor lines carry timestamps and fresh readings


def _fixed_code(*parts: object, digits: int = 4) -> int:
    """A stable alarm number per alarm type, as a PLC program would assign."""
    crc = zlib.crc32("|".join(map(str, parts)).encode())
    low = 10 ** (digits - 1)
    return low + crc % (9 * low)


def _uniform(rng: np.random.Generator, low: float, high: float, decimals: int) -> str:
    value = float(rng.uniform(low, high))
    return f"{value:.{decimals}f}" if decimals else str(round(value))


_SLOTS: dict[str, Callable[[np.random.Generator], str]] = {
    "n": lambda r: str(int(r.integers(1, 13))),
    "nn": lambda r: f"{int(r.integers(1, 41)):02d}",
    "code4": lambda r: str(int(r.integers(1000, 10000))),
    "wo": lambda r: str(int(r.integers(40000, 60000))),
    "count": lambda r: str(int(r.integers(100, 100000))),
    "recipe": lambda r: f"R{int(r.integers(1, 41))}",
    "amps": lambda r: _uniform(r, 15.0, 32.0, 1),
    "volts": lambda r: str(int(r.integers(430, 511))),
    "bar_low": lambda r: _uniform(r, 45, 110, 0),
    "bar_ok": lambda r: _uniform(r, 150, 205, 0),
    "air_low": lambda r: _uniform(r, 2.5, 4.6, 1),
    "temp_high": lambda r: _uniform(r, 92, 140, 0),
    "temp_ok": lambda r: _uniform(r, 38, 72, 0),
    "vib": lambda r: _uniform(r, 7.1, 16.0, 1),
    "pct": lambda r: _uniform(r, 3.5, 14.0, 1),
    "mm": lambda r: _uniform(r, 0.12, 0.8, 2),
    "grams": lambda r: str(int(r.integers(480, 495))),
    "ppm": lambda r: str(int(r.integers(40, 181))),
    "weird": lambda r: str(r.choice(_BROKEN_READINGS)),
}
_SLOT_RE = re.compile(r"\{(\w+)\}")


def _fill(template: str, rng: np.random.Generator, extra: dict[str, str] | None = None) -> str:
    def slot(m: re.Match[str]) -> str:
        name = m.group(1)
        if extra and name in extra:
            return extra[name]
        return _SLOTS[name](rng)

    return _SLOT_RE.sub(slot, template)


def _check_labels_covered(labels: Sequence[str]) -> None:
    missing = [label for label in labels if label not in _SYMPTOMS]
    if missing:
        raise ValueError(f"no phrase bank for labels {missing} from {LABELS_PATH}; extend tools/simulate.py")


# --------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------

# The fault classes each phrasing family's equipment produces more of (a press shop has more
# hydraulic trouble than a packaging hall).
_VARIANT_TYPICAL = (("hydraulic", "electrical"), ("pneumatic", "quality"), ("thermal", "mechanical"))


def site_profile(name: str, index: int, seed: int = 0) -> SiteProfile:
    """The profile of the index-th site for a seed; `default_sites` lists these for 0..n-1."""
    _check_labels_covered(LABELS)
    rng = np.random.default_rng([seed, index, 0x5173])
    variant = index % N_VOCAB_VARIANTS
    faults = [label for label in LABELS if label != "normal"]
    fault_mix = rng.dirichlet(np.full(len(faults), 0.9))
    for typical in _VARIANT_TYPICAL[variant]:
        if typical in faults:
            fault_mix[faults.index(typical)] *= 2.0
    normal_share = float(rng.uniform(0.22, 0.38)) if "normal" in LABELS else 0.0
    mix = dict(zip(faults, fault_mix / fault_mix.sum() * (1.0 - normal_share), strict=True))
    if "normal" in LABELS:
        mix["normal"] = normal_share
    # A floor keeps every class present at every site: rare, not absent.
    floored = {label: max(float(mix[label]), 0.02) for label in LABELS}
    total = sum(floored.values())
    return SiteProfile(
        name=name, label_weights={k: v / total for k, v in floored.items()}, vocab_variant=variant
    )


def default_sites(n_sites: int = 3, seed: int = 0) -> list[SiteProfile]:
    """`n_sites` sites named site0.. with different label mixes and phrasing families."""
    if n_sites < 1:
        raise ValueError("n_sites must be >= 1")
    return [site_profile(f"site{i}", i, seed) for i in range(n_sites)]


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------


class PlantStream:
    """The records one site's devices send, in order; `take` continues where the last call ended."""

    def __init__(
        self,
        site: SiteProfile,
        seed: int = 0,
        drift_at: int | None = None,
        label_noise: float = 0.0,
        repeat_rate: float = 0.18,
    ) -> None:
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
        if not 0.0 <= repeat_rate < 1.0:
            raise ValueError(f"repeat_rate must be in [0, 1), got {repeat_rate}")
        if drift_at is not None and drift_at < 0:
            raise ValueError(f"drift_at must be >= 0, got {drift_at}")
        labels = list(site.label_weights)
        _check_labels_covered(labels)
        weights = np.array([site.label_weights[label] for label in labels], dtype=float)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"site {site.name}: label_weights must be non-negative with a positive sum")
        self.site = site
        self.drift_at = drift_at
        self.label_noise = label_noise
        self.repeat_rate = repeat_rate
        self._labels = labels
        self._label_p = weights / weights.sum()
        self._variant = site.vocab_variant % N_VOCAB_VARIANTS
        site_key = zlib.crc32(site.name.encode())
        self._rng = np.random.default_rng([seed, site_key, 0])
        # Noise draws come from their own generator, so the same seed gives the same texts and
        # true labels at any noise level (tests compare them).
        self._noise_rng = np.random.default_rng([seed, site_key, 1])
        self._index = 0
        self._ts = 0.0
        self._seen: set[str] = set()
        self._pools: dict[bool, list[tuple[str, str]]] = {False: [], True: []}
        self._natural_repeats = 0
        self._kind_names = list(_KIND_WEIGHTS)
        self._kind_p = np.array(list(_KIND_WEIGHTS.values())) / sum(_KIND_WEIGHTS.values())

    def take(self, n: int) -> list[LabeledText]:
        """The next `n` records; records with index >= drift_at are drifted."""
        return [self._next() for _ in range(n)]

    def _next(self) -> LabeledText:
        rng = self._rng
        drifted = self.drift_at is not None and self._index >= self.drift_at
        self._index += 1
        self._ts += float(rng.exponential(_MEAN_GAP_S))
        text, label = self._repeat_or_fresh(drifted)
        if self.label_noise and self._noise_rng.random() < self.label_noise:
            others = [other for other in self._labels if other != label]
            label = others[int(self._noise_rng.integers(len(others)))]
        return LabeledText(
            text=text, label=label, site=self.site.name, ts=round(self._ts, 3), drifted=drifted
        )

    def _repeat_or_fresh(self, drifted: bool) -> tuple[str, str]:
        rng = self._rng
        # After a drift only post-drift texts repeat: operators copy what the new HMI shows.
        pool = self._pools[drifted]
        if rng.random() < self.repeat_rate and pool:
            if self._natural_repeats:
                # A fresh text already collided with an old one; count it against the target rate.
                self._natural_repeats -= 1
            else:
                window = pool[-_REPEAT_WINDOW:]
                return window[int(rng.integers(len(window)))]
        label = self._labels[int(rng.choice(len(self._labels), p=self._label_p))]
        kind = self._kind_names[int(rng.choice(len(self._kind_names), p=self._kind_p))]
        # Retry so that repeats come from the repeat draw above, not from a small phrase space.
        for _ in range(12):
            text = self._compose(kind, label, drifted)
            if text not in self._seen:
                break
        else:
            self._natural_repeats += 1
        self._seen.add(text)
        if kind in _KINDS_THAT_REPEAT:
            pool.append((text, label))
        return text, label

    # ---- composing one record ------------------------------------------------------------

    def _symptom(self, label: str, drifted: bool) -> _Symptom:
        rng = self._rng
        if label != "normal" and rng.random() < _SHARED_SYMPTOM_RATE:
            shared = [symptom for symptom, labels in _SHARED_SYMPTOMS if label in labels]
            if shared:
                return shared[int(rng.integers(len(shared)))]
        if label == "normal" and rng.random() < 0.04:
            shared = [symptom for symptom, labels in _SHARED_SYMPTOMS if label in labels]
            return shared[int(rng.integers(len(shared)))]
        bank = _SYMPTOMS[label]
        if drifted and label in _DRIFT_SYMPTOMS and rng.random() < _DRIFT_SYMPTOM_RATE:
            bank = _DRIFT_SYMPTOMS[label]
        return bank[int(rng.integers(len(bank)))]

    def _machine(self, label: str) -> tuple[str, str]:
        rng = self._rng
        machines = _MACHINES[self._variant]
        fitting = [m for m in machines if label in m[2]] or list(machines)
        name, station, _ = fitting[int(rng.integers(len(fitting)))]
        n = str(int(rng.integers(1, 10)))
        extra = {"n": n, "nn": f"{int(n):02d}"}
        return _fill(name, rng, extra), _fill(station, rng, extra)

    def _compose(self, kind: str, label: str, drifted: bool) -> str:
        if kind == "sensor":
            return self._sensor_line(label, drifted)
        symptom = self._symptom(label, drifted)
        if kind == "alarm":
            return self._alarm(label, symptom, drifted)
        if kind == "log":
            return self._log_line(label, symptom)
        return self._note(label, symptom, drifted)

    def _log_line(self, label: str, symptom: _Symptom) -> str:
        rng = self._rng
        machine, _ = self._machine(label)
        levels = _LOG_LEVELS[self._variant]
        if label == "normal":
            level = levels[0] if rng.random() < 0.85 else levels[1]
        else:
            level = levels[int(rng.choice(3, p=[0.12, 0.5, 0.38]))]
        when = _STREAM_EPOCH + dt.timedelta(seconds=self._ts)
        message = _fill(symptom[0], rng, {"machine": machine})
        controller = int(rng.integers(1, 9))
        if self._variant == 0:
            return f"{when:%Y-%m-%dT%H:%M:%S} PLC{controller} {level} {machine} {message}"
        if self._variant == 1:
            return f"{when:%b %d %H:%M:%S} plc-{controller:02d} [{level}] {machine}: {message}"
        return f"[{when:%H:%M:%S}.{when.microsecond // 1000:03d}] {machine} {level} {message}"

    def _alarm(self, label: str, symptom: _Symptom, drifted: bool) -> str:
        rng = self._rng
        machine, _ = self._machine(label)
        title = _fill(symptom[1], rng, {"machine": machine})
        prefixes = _TAG_PREFIXES.get(label, ("X",))
        tag = f"{prefixes[int(rng.integers(len(prefixes)))]}-{int(rng.integers(1, 41)):02d}"
        if drifted:
            # New PLC firmware: numbered events with mnemonics instead of readable titles.
            code = _fixed_code("fw2", symptom[1], digits=5)
            words = [re.sub(r"\W", "", w) for w in symptom[1].split()[:4]]
            mnemonic = "_".join(_MNEMONICS.get(w.lower(), w[:4].upper()) for w in words)
            if self._variant == 0:
                return f"EVT {code} {mnemonic} {tag} prio={int(rng.integers(1, 4))}"
            if self._variant == 1:
                return f"{mnemonic}:{code} {machine.upper()}"
            return f"E{code} {mnemonic} ({machine})"
        code = _fixed_code(self._variant, symptom[1])
        if self._variant == 0:
            return f"ALM {code} {title} {tag}"
        if self._variant == 1:
            return f"A-{code}: {title.upper()} {machine.upper()}"
        return f"#{code} {title.lower()} ({machine})"

    def _note(self, label: str, symptom: _Symptom, drifted: bool) -> str:
        rng = self._rng
        machine, _ = self._machine(label)
        fill = {"machine": machine}
        problem = _fill(symptom[2], rng, fill)
        actions = _ACTIONS[label]
        action = _fill(actions[int(rng.integers(len(actions)))], rng, fill)
        first, second = rng.choice(len(_FOLLOWUPS), size=2, replace=False)
        followup = _fill(_FOLLOWUPS[first], rng, fill)
        shape = rng.random()
        if self._variant == 0:
            templates = ("{p}, {a}", "{m}: {p}. {a}", "{p} on {m}, {a}", "{a} on {m} - {p}", "{p}")
        elif self._variant == 1:
            templates = ("{m} {p} - {a}", "{p} {m} {a}", "{m}: {p}/{a}", "{p}", "{m} {p}")
        else:
            templates = ("{m}; {p}; {a}", "{p} ({m}), {a}", "{m} {p}. {a}", "{p}; {a}", "{m}: {p}")
        note = templates[int(rng.integers(len(templates)))].format(p=problem, a=action, m=machine)
        if shape < 0.25:
            note = f"{note}, {followup}"
        elif shape < 0.31:
            # The long tail: an operator writing up a whole shift's story.
            other = symptom
            for _ in range(4):  # a second, different problem on the same shift
                other = self._symptom(label, drifted)
                if other != symptom:
                    break
            problem2 = _fill(other[2], rng, fill)
            action2 = _fill(actions[int(rng.integers(len(actions)))], rng, fill)
            followup2 = _fill(_FOLLOWUPS[second], rng, fill)
            note = f"{note}. also {problem2}, {action2}. {followup}, {followup2}"
        return self._operator_style(note)

    def _operator_style(self, note: str) -> str:
        rng = self._rng
        words = note.split(" ")
        abbreviation_rate = _ABBREVIATION_RATE[self._variant]
        for i, word in enumerate(words):
            bare = word.rstrip(",.;:").lower()
            options = _ABBREVIATIONS.get(bare)
            if options and rng.random() < abbreviation_rate:
                words[i] = options[int(rng.integers(len(options)))] + word[len(bare) :]
        if rng.random() < _TYPO_RATE[self._variant]:
            long_words = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
            for i in rng.permutation(long_words)[: int(rng.integers(1, 3))]:
                words[i] = _typo(words[i], rng)
        note = re.sub(r"\s+", " ", " ".join(w for w in words if w)).strip()
        if rng.random() < _SHOUTING_RATE[self._variant]:
            return note.upper()
        return note

    def _sensor_line(self, label: str, drifted: bool) -> str:
        rng = self._rng
        _, station = self._machine(label)
        keys = (_DRIFT_SENSOR_KEYS if drifted else _SENSOR_KEYS)[self._variant]
        fault_quantity = _FAULT_QUANTITY.get(label)
        if label == "sensor_fault":
            fault_quantity = _QUANTITIES[int(rng.integers(len(_QUANTITIES)))]
        others = [q for q in _QUANTITIES if q != fault_quantity]
        n_shown = int(rng.integers(2, 4))
        shown = set(rng.permutation(others)[: n_shown - (1 if fault_quantity else 0)].tolist())
        if fault_quantity:
            shown.add(fault_quantity)
        fields = []
        for quantity in _QUANTITIES:  # a device always writes its keys in the same order
            if quantity not in shown:
                continue
            if quantity == fault_quantity and label == "sensor_fault":
                value = str(rng.choice(_BROKEN_READINGS))
            elif quantity == fault_quantity:
                value = _uniform(rng, *_FAULT_RANGE[quantity])
            else:
                value = _uniform(rng, *_NORMAL_RANGE[quantity])
            fields.append(f"{keys[quantity]}={value}")
        line_no = int(rng.integers(1, 6))
        if self._variant == 0:
            head = f"line={line_no} station={station}"
        elif self._variant == 1:
            warn = (label != "normal") == (rng.random() < 0.75)
            head = f"asset={station} status={'WARN' if warn else 'OK'}"
        else:
            head = f"mc={station} prog=O{int(rng.integers(1000, 10000))}"
        return " ".join([head, *fields])


def _typo(word: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(1, len(word) - 1))
    operation = int(rng.integers(3))
    if operation == 0:  # swapped neighbours
        return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    if operation == 1:  # dropped letter
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # doubled letter


def labeled_dataset(n: int, seed: int = 0, sites: int = 3, drift: bool = False) -> list[LabeledText]:
    """`n` records from `sites` default sites (split evenly), merged in time order.

    With `drift=True` each site drifts halfway through its share, so about the later half of the
    list is drifted; select on `LabeledText.drifted`.
    """
    profiles = default_sites(sites, seed)
    records: list[tuple[float, int, LabeledText]] = []
    for i, profile in enumerate(profiles):
        count = n // sites + (1 if i < n % sites else 0)
        stream = PlantStream(profile, seed=seed, drift_at=count // 2 if drift else None)
        records.extend((r.ts, i, r) for r in stream.take(count))
    records.sort(key=lambda item: (item[0], item[1]))
    return [r for _, _, r in records]


def stream_texts(n: int, seed: int = 0) -> list[str]:
    """Unlabeled texts for inference benchmarks: realistic lengths and repetition (mostly short, many exact repeats)."""
    return [r.text for r in labeled_dataset(n, seed=seed)]


# --------------------------------------------------------------------------------------------
# Publishing (shared with tools.replay)
# --------------------------------------------------------------------------------------------

_TOPIC_FORBIDDEN = re.compile(r"[/+#\x00]")


def check_topic_level(value: str, what: str) -> str:
    """`value` unchanged if it can be one MQTT topic level, else ValueError naming `what`."""
    if not value or _TOPIC_FORBIDDEN.search(value):
        raise ValueError(f"{what} {value!r} cannot be an MQTT topic level (empty, or has / + # or NUL)")
    return value


def samples_topic(site: str, device: str) -> str:
    """Topic for labeled samples of one device."""
    return f"edge/{check_topic_level(site, 'site')}/{check_topic_level(device, 'device')}/samples"


def events_topic(site: str, device: str) -> str:
    """Topic for unlabeled records to classify (stream mode)."""
    return f"edge/{check_topic_level(site, 'site')}/{check_topic_level(device, 'device')}/events"


def sample_payload(record: LabeledText, labeled: bool = True, now: float | None = None) -> dict[str, Any]:
    """The JSON body a device sends: a fresh message id, the text, and for samples label and epoch time."""
    payload: dict[str, Any] = {"id": str(uuid.uuid4()), "text": record.text}
    if labeled:
        payload["label"] = record.label
        payload["ts"] = round(time.time() if now is None else now, 3)
    return payload


class DryRunPublisher:
    """Writes each payload as one JSON line instead of publishing (for piping and inspection)."""

    def __init__(self, out: Any = None) -> None:
        self._out = out or sys.stdout

    def __enter__(self) -> DryRunPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self._out.flush()

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        log.debug("dry run: %s id=%s", topic, payload["id"])
        self._out.write(json.dumps(payload, ensure_ascii=False) + "\n")


class MqttSamplePublisher:
    """Publishes JSON payloads at QoS 1 over MQTT 5 and waits for each PUBACK, as a device would."""

    def __init__(self, host: str, port: int, client_id: str, timeout_s: float = 10.0) -> None:
        import paho.mqtt.client as mqtt  # only the publishing paths need paho

        self._timeout_s = timeout_s
        self._host, self._port = host, port
        self._connack = threading.Event()
        self._connack_error: str | None = None
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.on_connect = self._on_connect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        # paho calls this for refused connections too; a refusal must not count as connected.
        self._connack_error = str(reason_code) if reason_code.is_failure else None
        self._connack.set()

    def __enter__(self) -> MqttSamplePublisher:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()
        if not self._connack.wait(self._timeout_s):
            self._client.loop_stop()
            raise ConnectionError(f"no CONNACK from {self._host}:{self._port} in {self._timeout_s:.0f}s")
        if self._connack_error:
            self._client.loop_stop()
            raise ConnectionError(
                f"broker {self._host}:{self._port} refused the connection: {self._connack_error}"
            )
        log.info("connected to %s:%s", self._host, self._port)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        info = self._client.publish(topic, json.dumps(payload, ensure_ascii=False), qos=1)
        info.wait_for_publish(self._timeout_s)
        if not info.is_published():
            raise ConnectionError(
                f"publish of {payload['id']} to {topic} not acknowledged in {self._timeout_s:.0f}s"
            )
        log.debug("published %s id=%s", topic, payload["id"])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _site_for(name: str, seed: int) -> SiteProfile:
    # `siteK` matches default_sites(...)[K]; any other name gets a stable profile of its own.
    match = re.fullmatch(r"site(\d+)", name)
    index = int(match.group(1)) if match else zlib.crc32(name.encode()) % 1000
    return site_profile(name, index, seed)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", default="localhost", help="MQTT broker host")
    p.add_argument("--port", type=int, default=1883, help="MQTT broker port")
    p.add_argument(
        "--site", default="site0", help="site name (topic level); siteK uses default site K's profile"
    )
    p.add_argument("--device", default="sim0", help="device name (topic level)")
    p.add_argument("--rate", type=float, default=5.0, help="records per second; 0 sends as fast as possible")
    p.add_argument("--count", type=int, default=100, help="number of records")
    p.add_argument("--drift-at", type=int, default=None, help="index of the first drifted record")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.0, help="probability of a wrong label")
    p.add_argument(
        "--unlabeled", action="store_true", help="send {id, text} on .../events instead of samples"
    )
    p.add_argument("--dry-run", action="store_true", help="print JSON lines to stdout instead of publishing")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tools.simulate`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        topic = (events_topic if args.unlabeled else samples_topic)(args.site, args.device)
        stream = PlantStream(
            _site_for(args.site, args.seed),
            seed=args.seed,
            drift_at=args.drift_at,
            label_noise=args.label_noise,
        )
    except ValueError as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    publisher: DryRunPublisher | MqttSamplePublisher
    if args.dry_run:
        publisher = DryRunPublisher()
    else:
        publisher = MqttSamplePublisher(
            args.broker, args.port, client_id=f"edge-sim-{args.site}-{args.device}"
        )
    log.info("site=%s device=%s topic=%s count=%d", args.site, args.device, topic, args.count)
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    try:
        with publisher:
            next_at = time.monotonic()
            for record in stream.take(args.count):
                publisher.publish(topic, sample_payload(record, labeled=not args.unlabeled))
                if interval:
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))
    except (ConnectionError, OSError) as e:
        log.error("broker %s:%s: %s", args.broker, args.port, e)
        return EXIT_BROKER_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
