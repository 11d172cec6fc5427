"""Synthetic maintenance work orders with character-offset entities, for named-entity recognition.

A `WorkOrderStream` produces what technicians type into a CMMS at a few sites: "repl. brg on pump
P-101, noisy at 85 °C", with the entity spans ACTION "repl.", COMPONENT "brg", ASSET "pump P-101",
FAILURE "noisy", QUANTITY "85 °C". Labels come from `models/entities.json`; streams are deterministic
for a seed and pure Python + numpy, like `tools.simulate`, whose typo helper they share.

Annotation conventions (the CRF baseline and the readers in `tools.replay` follow them):

* ASSET is the tagged equipment as written: the tag with the family word right before it when the
  note has one ("pump P-101", "ctrl vlv CV-2031"), else the tag alone ("P-101"). A family word
  without a tag ("the pump") is not an entity; the simulator does not write one.
* QUANTITY is the number with its unit ("3 bar", "85°C", "2,5 kW", "2 pcs"); qualifiers such as
  "approx" or "~" stay outside. A bare number (a work-order number) is no entity.
* PART is a part number with its maker or "PN"/"P/N" prefix ("SKF 6205-2RS", "PN 4471-220").
* ACTION, COMPONENT, FAILURE are the words as typed, abbreviations and typos included ("repl.",
  "chk'd", "DE brg", "o/heating"); an abbreviation's dot belongs to the entity.
* Spans never overlap, never start or end with whitespace, and `text[start:end]` is the entity.

Sites differ in asset families and tag formats (ISA-style process tags, short packaging machine
numbers, machining asset numbers), in the subset of templates they write, and in how much they
abbreviate, misspell and shout. A drift event brings new asset families and tag formats ("P101A",
"EQ-10234"), new failure modes ("cavitating", "fretting"), new components, new shorthand ("R&R'd",
"c/o"), new units (psi, °F) and new CMMS-export layouts, so a model trained before the drift
measurably loses F1 after it.

CLI: `python -m tools.workorders --n 1000 --drift-at 500 --jsonl out.jsonl` (see `--help`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tools.simulate import _typo, _uniform, load_labels

__all__ = [
    "ENTITY_LABELS",
    "ENTITY_LABELS_PATH",
    "Span",
    "WorkOrder",
    "SiteVocabulary",
    "WorkOrderStream",
    "site_vocabulary",
    "default_site_vocabularies",
    "workorder_dataset",
    "to_payload",
    "main",
]

log = logging.getLogger(__name__)

ENTITY_LABELS_PATH = Path(__file__).resolve().parents[1] / "models" / "entities.json"
ENTITY_LABELS: tuple[str, ...] = tuple(load_labels(ENTITY_LABELS_PATH))

Span = tuple[int, int, str]  # (start, end, label): text[start:end] is the entity


@dataclass(frozen=True)
class WorkOrder:
    """One work-order text with its entity spans, sorted by start and never overlapping."""

    text: str
    entities: tuple[Span, ...]
    site: str
    ts: float = 0.0  # seconds since stream start (monotone within a stream)
    drifted: bool = False  # True when written under a drift event


@dataclass(frozen=True)
class SiteVocabulary:
    """What makes a site's work orders its own, before or after its drift event.

    `banks` maps a slot kind ("asset", "component", "failure", "action", "part", "template") to the
    items the site uses; `novel` holds the items that only appear after a drift (empty before), drawn
    with probability `novel_share` per slot. `shorthand` maps a word to how the site abbreviates it.
    """

    name: str
    index: int
    seed: int
    variant: int  # which asset family / tag format the site uses (0 process, 1 packaging, 2 machining)
    drifted: bool
    banks: dict[str, tuple[str, ...]]
    novel: dict[str, tuple[str, ...]]
    novel_share: float
    shorthand: dict[str, tuple[str, ...]]
    abbreviation_rate: float  # per word that has a shorthand
    typo_rate: float  # per text: one or two misspelt words
    shouting_rate: float  # per text: all upper case
    capitalize_rate: float  # per text: first letter upper case
    noun_rate: float  # per asset: the family word is written before the tag
    lower_tag_rate: float  # per asset: the tag is written in lower case ("p-101")
    unit_space_rate: float  # per quantity: "3 bar" rather than "3bar"
    decimal_comma_rate: float  # per decimal quantity: "2,5 kW"


# --------------------------------------------------------------------------------------------
# Vocabulary. Asset patterns are "family word(s) TAG" or a bare "TAG"; the tag is the last word.
# `{dN}` is an N-digit number, `{a}` a unit suffix letter, `{brg}` a rolling-bearing designation.
# --------------------------------------------------------------------------------------------

_ASSETS: tuple[tuple[str, ...], ...] = (
    (  # 0: process plant, ISA-style tags
        "pump P-{d3}",
        "pump P-{d3}{a}",
        "control valve CV-{d4}",
        "flow transmitter FT-{d2}",
        "pressure transmitter PT-{d3}",
        "heat exchanger E-{d3}",
        "compressor K-{d3}",
        "tank TK-{d2}",
        "agitator AG-{d3}",
    ),
    (  # 1: packaging hall, short machine numbers
        "motor M{d1}",
        "conveyor C{d2}",
        "filler F{d1}",
        "labeler L{d1}",
        "capper CP{d1}",
        "palletizer PZ{d1}",
        "wrapper W{d1}",
        "case packer PK-{d1}",
    ),
    (  # 2: machining, asset numbers
        "CNC-{d2}",
        "lathe T{d2}",
        "mill M-{d2}",
        "spindle SP-{d1}",
        "hyd unit HU-{d2}",
        "chiller CH-{d1}",
        "grinder G-{d2}",
        "robot R-{d2}",
    ),
)
N_VARIANTS = len(_ASSETS)

# After a drift: a new tagging standard and equipment the old vocabulary never named.
_NOVEL_ASSETS: tuple[tuple[str, ...], ...] = (
    ("pump P{d3}{a}", "valve XV{d4}-{d2}", "dosing skid DS-{d2}", "blower BL{d3}", "scrubber SCR-{d3}"),
    ("L{d1}-ST{d2}", "case erector CE{d1}", "shrink wrapper SW{d1}", "robot RB-{d2}", "checkweigher CW{d1}"),
    ("EQ-{d5}", "machining center MC{d3}", "asset #{d5}", "laser LS-{d2}", "EDM unit ED{d1}"),
)

_COMPONENTS = (
    "bearing",
    "DE bearing",
    "NDE bearing",
    "mechanical seal",
    "seal",
    "gasket",
    "O-ring",
    "impeller",
    "coupling",
    "shaft",
    "V-belt",
    "drive belt",
    "chain",
    "sprocket",
    "filter element",
    "strainer",
    "valve seat",
    "actuator",
    "positioner",
    "diaphragm",
    "gland packing",
    "solenoid",
    "contactor",
    "fuse",
    "cooling fan",
    "terminal block",
    "proximity sensor",
    "limit switch",
    "hose",
    "fitting",
    "nozzle",
    "brake",
    "gear",
    "wear strip",
    "roller",
    "thermocouple",
    "idler",
    "tensioner",
    "pulley",
    "bushing block",
    "guide rail",
    "scraper blade",
    "check valve",
    "relief valve",
    "pressure switch",
    "level switch",
    "motor winding",
    "starter",
    "relay",
    "circuit breaker",
    "junction box",
    "oil seal",
    "wear plate",
    "cam follower",
    "vacuum cup",
    "gripper finger",
    "heater element",
    "door interlock",
    # Family words of assets elsewhere: the pump of a CNC is a COMPONENT, "pump P-101" an ASSET.
    "motor",
    "pump",
    "coolant pump",
    "compressor",
    "fan",
    "gearbox",
    "valve",
    "filter",
    # The long tail: each seen a few times in a year of notes, some never before a given one.
    "anti-vibration mount",
    "baffle plate",
    "bellows",
    "belt guard",
    "bleed screw",
    "blower wheel",
    "bottom bracket",
    "breather cap",
    "bus bar",
    "cable gland",
    "carbon brush",
    "cartridge heater",
    "casing",
    "clutch pack",
    "collet",
    "cooling coil",
    "counterweight",
    "damper",
    "dog clutch",
    "drain valve",
    "drive chain",
    "dust boot",
    "expansion joint",
    "eyebolt",
    "feed screw",
    "flow switch",
    "flywheel",
    "gear pump",
    "grease nipple",
    "grub screw",
    "hinge pin",
    "hydraulic hose",
    "inspection hatch",
    "jaw coupling",
    "key",
    "knife gate",
    "level probe",
    "lock nut",
    "manifold",
    "mesh screen",
    "needle valve",
    "oil cooler",
    "overload relay",
    "pilot light",
    "piston rod",
    "pressure gauge",
    "push button",
    "ratchet",
    "reducer",
    "rod end",
    "rotor",
    "safety valve",
    "sight glass",
    "spring",
    "stator",
    "stuffing box",
    "suction cup",
    "support leg",
    "tie rod",
    "timing belt",
    "toggle clamp",
    "torque arm",
    "transformer",
    "trunnion",
    "turbo fan",
    "u-joint",
    "vane",
    "volute",
    "washer",
    "wiper",
    "worm gear",
)
_NOVEL_COMPONENTS = (
    "VFD",
    "encoder",
    "IO-Link master",
    "soft starter",
    "wear ring",
    "labyrinth seal",
    "bushing",
    "linear guide",
    "ball screw",
    "slip ring",
    "servo drive",
    "lip seal",
)

_FAILURES = (
    "leaking",
    "seized",
    "overheating",
    "noisy",
    "excessive vibration",
    "worn",
    "cracked",
    "broken",
    "tripped",
    "stuck",
    "blocked",
    "clogged",
    "misaligned",
    "loose",
    "corroded",
    "slipping",
    "burnt",
    "intermittent",
    "no output",
    "drifting",
    "sticking",
    "chattering",
    "shorted",
    "low flow",
    "humming",
    "out of tolerance",
    "bent",
    "jammed",
    "frayed",
    "dented",
    "rusted",
    "squealing",
    "rattling",
    "not closing",
    "not starting",
    "dead",
    "erratic",
    "sluggish",
    "overloaded",
    "weak",
    "dripping",
    "grinding",
    "smoking",
    "failed",
    "binding",
    "buckled",
    "chipped",
    "contaminated",
    "deformed",
    "dry",
    "eroded",
    "flickering",
    "fluctuating",
    "frozen",
    "hot",
    "iced up",
    "knocking",
    "melted",
    "missing",
    "not holding",
    "open circuit",
    "out of adjustment",
    "overpressure",
    "perished",
    "popping",
    "scored",
    "sheared",
    "shorting",
    "sparking",
    "split",
    "stalling",
    "stripped",
    "swollen",
    "tearing",
    "unbalanced",
    "underpowered",
    "warped",
    "wobbling",
)
_NOVEL_FAILURES = (
    "cavitating",
    "pitting",
    "scoring",
    "fretting",
    "earth fault",
    "delaminated",
    "tracking off",
    "hunting",
    "galled",
    "spalling",
    "arcing",
    "short cycling",
    "glazed",
    "weeping",
)

# Past participles, so that "to be {ACTION}" reads as well as "{ACTION} the seal".
_ACTIONS = (
    "replaced",
    "inspected",
    "checked",
    "tightened",
    "adjusted",
    "cleaned",
    "lubricated",
    "greased",
    "realigned",
    "repaired",
    "reset",
    "calibrated",
    "changed",
    "installed",
    "removed",
    "retorqued",
    "rewired",
    "flushed",
    "tested",
    "refitted",
    "bled",
    "blew out",
    "dressed",
    "drained",
    "filled",
    "isolated",
    "packed",
    "primed",
    "reseated",
    "secured",
    "serviced",
    "sealed",
    "soldered",
    "straightened",
    "topped up",
    "welded",
)
_NOVEL_ACTIONS = (
    "swapped",
    "overhauled",
    "shimmed",
    "re-terminated",
    "rebuilt",
    "re-machined",
    "honed",
    "descaled",
)

_PARTS = (
    "SKF {brg}",
    "FAG {brg}",
    "NSK {brg}",
    "PN {d4}-{d3}",
    "P/N {d4}-{d3}",
    "Gates 3V{d3}",
    "Gates SPZ{d4}",
    "Parker 2-{d3}",
)
_NOVEL_PARTS = ("MAT-000{d6}", "SAP {d7}", "Festo {d7}", "stock #{d5}")

# Quantity kinds: (unit, low, high, decimals). Units in `_NOVEL_UNITS` appear only after a drift.
_UNITS: dict[str, tuple[tuple[str, float, float, int], ...]] = {
    "pressure": (("bar", 0.5, 16.0, 1), ("bar", 1, 12, 0), ("kPa", 50, 900, 0)),
    "temp": (("°C", 40, 140, 0), ("degC", 40, 140, 0), ("C", 40, 140, 0)),
    "length": (("mm", 0.05, 2.0, 2), ("mm", 1, 40, 0)),
    "power": (("kW", 0.5, 90.0, 1),),
    "torque": (("Nm", 10, 400, 0),),
    "vib": (("mm/s", 1.0, 25.0, 1),),
    "current": (("A", 2.0, 80.0, 1),),
    "speed": (("rpm", 300, 3600, 0),),
    "time": (("hrs", 0.5, 8.0, 1), ("h", 1, 8, 0), ("min", 10, 90, 0)),
    "count": (("pcs", 2, 12, 0), ("x", 2, 6, 0)),
}
_NOVEL_UNITS: dict[str, tuple[tuple[str, float, float, int], ...]] = {
    "pressure": (("psi", 10, 220, 0),),
    "temp": (("°F", 100, 280, 0),),
    "length": (("in", 0.01, 0.5, 3),),
    "power": (("hp", 1, 120, 0),),
    "torque": (("ft-lb", 10, 300, 0),),
    "vib": (("in/s", 0.05, 1.0, 2), ("g", 0.2, 6.0, 1)),
    "current": (("mA", 2.0, 24.0, 1),),
    "speed": (("RPM", 300, 3600, 0),),
    "time": (("MH", 0.5, 6.0, 1),),
    "count": (("EA", 1, 10, 0),),
}

# `{LABEL}` / `{LABEL2}` are entity slots (`{QUANTITY:kind}` picks the unit family); lower-case
# `{wo}` and `{approx}` are filler that is no entity. Word order varies on purpose: technicians
# start with the asset, the action, the symptom or the part as it comes to them.
_TEMPLATES = (
    "{ACTION} {COMPONENT} on {ASSET}, {FAILURE} at {approx}{QUANTITY:pressure}",
    "{ASSET} {COMPONENT} {FAILURE}, {ACTION}",
    "{ASSET}: {FAILURE} {COMPONENT}. {ACTION} with {PART}",
    "{COMPONENT} {FAILURE} on {ASSET} - {ACTION} and {ACTION2} {COMPONENT2}",
    "{FAILURE} {COMPONENT} found during PM on {ASSET}, {ACTION} {PART}",
    "{ASSET} stopped, {COMPONENT} {FAILURE} at {QUANTITY:temp}, {ACTION}",
    "{ACTION} {COMPONENT} ({PART}) on {ASSET}",
    "{ACTION} {COMPONENT} to {QUANTITY:torque} on {ASSET}",
    "{ASSET} - {COMPONENT} {FAILURE}, gap {QUANTITY:length}, {ACTION}",
    "{FAILURE} on {ASSET} {COMPONENT}, {ACTION} it, running ok",
    "{ASSET} {FAILURE}",
    "{ACTION} {COMPONENT} {ASSET}",
    "{ASSET} {COMPONENT} {ACTION}",
    "{COMPONENT} on {ASSET} was {FAILURE}. {ACTION} with new {PART}",
    "operator reports {ASSET} {FAILURE}, {ACTION} {COMPONENT}, {QUANTITY:time} labour",
    "{ASSET} drawing {QUANTITY:current}, {FAILURE} {COMPONENT} {ACTION}",
    "{ACTION} {PART} in {ASSET} {COMPONENT}",
    "PM {ASSET}: {ACTION} {COMPONENT}, {ACTION2} {COMPONENT2}, all ok",
    "{ASSET} {COMPONENT} {FAILURE} {approx}{QUANTITY:vib}",
    "{COMPONENT} on {ASSET} {FAILURE}, to be {ACTION} at next shutdown",
    "{ASSET} running {QUANTITY:temp} - {COMPONENT} {FAILURE}",
    "WO {wo} {ASSET} {ACTION} {COMPONENT} {PART}",
    "{ACTION} {COMPONENT} and {COMPONENT2} on {ASSET} ({FAILURE})",
    "{FAILURE}! {ASSET} {COMPONENT} {ACTION} with {PART}, set to {QUANTITY:pressure}",
    "{ASSET} {FAILURE} again, {ACTION} {COMPONENT}, {QUANTITY:time}",
    "{ACTION} {QUANTITY:count} {PART} on {ASSET}",
    "{ASSET} / {COMPONENT}: {FAILURE}, {ACTION}",
    "{ACTION} {COMPONENT}, was {FAILURE} ({QUANTITY:length} play) - {ASSET}",
    "{ASSET} {COMPONENT} {QUANTITY:temp} {FAILURE} {ACTION} {PART}",
    "{ASSET} at {QUANTITY:speed}, {COMPONENT} {FAILURE}, {ACTION} {COMPONENT2}",
    "{ASSET} {COMPONENT} load {QUANTITY:power}, {FAILURE}",
    "{FAILURE} - {ACTION} {COMPONENT} on {ASSET} with {PART}",
)
_NOVEL_TEMPLATES = (
    "WO{wo} | {ASSET} | {ACTION} {COMPONENT} | {FAILURE} | {QUANTITY:time}",
    "[{ASSET}] {ACTION} {COMPONENT} - {FAILURE} obs.",
    "{ASSET} >> {FAILURE} >> {ACTION} {PART}",
    "{ASSET}; {COMPONENT}; {FAILURE} @ {QUANTITY:pressure}; {ACTION}",
    "vib route {ASSET} {FAILURE} {QUANTITY:vib} -> {ACTION} {COMPONENT}",
    "{COMPONENT} {FAILURE} ({ASSET}) / {ACTION} / {QUANTITY:count} {PART}",
)

# Clauses of the made-up-on-the-spot notes (`_Writer._narrative`).
_CLAUSES = (
    "{COMPONENT} {FAILURE}",
    "{FAILURE} {COMPONENT}",
    "{ACTION} {COMPONENT}",
    "{ACTION} {PART}",
    "{COMPONENT} {ACTION}",
    "{FAILURE}",
    "{ACTION}",
    "{COMPONENT} at {QUANTITY:temp}",
    "{FAILURE} at {QUANTITY:pressure}",
    "{ACTION} to {QUANTITY:torque}",
    "{QUANTITY:time} labour",
    "{ACTION} {QUANTITY:count} {PART}",
    "{COMPONENT} {FAILURE} {approx}{QUANTITY:vib}",
    "{COMPONENT} {QUANTITY:length} out",
    "{ACTION} {COMPONENT} w/ {PART}",
)

# How technicians shorten words; applied per word in entities and filler alike.
_SHORTHAND: dict[str, tuple[str, ...]] = {
    "replaced": ("repl.", "rplcd", "repl"),
    "inspected": ("insp.", "insp'd"),
    "checked": ("chk'd", "chkd", "chk."),
    "tightened": ("tight'd", "tghtd"),
    "adjusted": ("adj.", "adj'd"),
    "cleaned": ("cln'd",),
    "lubricated": ("lubed", "lub'd"),
    "calibrated": ("cal'd", "calib."),
    "changed": ("chg'd", "chgd"),
    "installed": ("inst'd",),
    "repaired": ("rep'd",),
    "bearing": ("brg",),
    "mechanical": ("mech",),
    "coupling": ("cplg",),
    "gasket": ("gskt",),
    "excessive": ("exc.", "xs"),
    "vibration": ("vib", "vibr."),
    "leaking": ("lkg", "leakin"),
    "overheating": ("o/heating", "overheatin"),
    "intermittent": ("intermit.", "interm."),
    "control": ("ctrl",),
    "valve": ("vlv",),
    "transmitter": ("xmtr", "tx"),
    "exchanger": ("exch",),
    "compressor": ("comp",),
    "conveyor": ("conv",),
    "pressure": ("press.", "pres"),
    "with": ("w/",),
    "and": ("&", "+"),
    "operator": ("op",),
    "found": ("fnd",),
    "shutdown": ("s/d",),
    "running": ("runnin",),
}
_NOVEL_SHORTHAND: dict[str, tuple[str, ...]] = {
    "replaced": ("R&R'd", "c/o"),
    "changed": ("c/o", "x-chg'd"),
    "inspected": ("VI'd",),
    "overhauled": ("o/h'd", "O/H"),
    "bearing": ("brng",),
    "leaking": ("lk'g", "lkng"),
    "with": ("c/w",),
    "vibration": ("vibes",),
    "cavitating": ("cav'ing",),
    "shutdown": ("S/D",),
}
_APPROX = ("", "", "approx ", "~", "abt ", "ca. ")
# Inside a COMPONENT: where on the asset ("upper roller", "#2 bearing"), as annotators mark it.
_COMPONENT_MODIFIERS = (
    "inboard",
    "outboard",
    "upper",
    "lower",
    "front",
    "rear",
    "drive side",
    "main",
    "#2",
    "LH",
    "RH",
)
# Inside a COMPONENT too: the part of the part ("pump seal", "fan guard", "motor cable").
_SUBPARTS = ("cover", "housing", "mount", "bolts", "cable", "guard", "bracket", "flange", "seal", "bearing")
# Outside the entities: what the technician says about it. "old seal" is COMPONENT "seal", "badly
# worn" is FAILURE "worn", so a model has to learn where the entity starts.
_DETERMINERS = ("the ", "old ", "both ", "all ", "new ")
_DEGREES = ("badly ", "slightly ", "very ", "a bit ", "really ")
# Reference numbers look like tags but are no ASSET: procedures, permits, change requests.
_REFERENCES = ("SOP-{d3}", "PTW-{d4}", "MOC-{d4}", "WR-{d5}", "JSA-{d3}")
_FOLLOWUPS = (
    "informed shift lead",
    "monitor next shift",
    "parts on order",
    "running again",
    "see WO {wo}",
    "ok for now",
    "need recheck tomorrow",
    "handed over to night shift",
    "per {ref}",
    "permit {ref} closed",
    "ref {ref}",
    "area tidied up",
    "sounds ok now",
    "took two of us",
    "waiting on electrician",
    "photos in ticket",
    "line back up",
    "no spares on site",
    "2nd time this week",
    "shift {d1} to follow up",
)
_ZIPF_EXPONENT = 1.0  # bank items by site-specific rank: a few words common, a long tail rare

# Per variant: how much the site's technicians abbreviate, misspell, shout, name the family.
_ABBREVIATION_RATE = (0.25, 0.5, 0.35)
_TYPO_RATE = (0.3, 0.45, 0.25)
_SHOUTING_RATE = (0.03, 0.2, 0.05)
_NOUN_RATE = (0.7, 0.5, 0.6)
_LOWER_TAG_RATE = (0.05, 0.3, 0.1)
_UNIT_SPACE_RATE = (0.85, 0.5, 0.7)
_DECIMAL_COMMA_RATE = (0.0, 0.1, 0.6)
_SITE_TEMPLATES = 24  # of len(_TEMPLATES): each site writes its own subset
_SITE_COMPONENT_SHARE = 0.8
_MODIFIER_RATE = 0.2
_SUBPART_RATE = 0.15
_NARRATIVE_RATE = 0.3
_DETERMINER_RATE = 0.2
_DEGREE_RATE = 0.15
_FOLLOWUP_RATE = 0.35
_NOVEL_SHARE = 0.6  # share of post-drift slots drawn from the new vocabulary
_MEAN_GAP_S = 60.0

_SLOT_RE = re.compile(r"\{([A-Z]+)\d?(?::([a-z]+))?\}|\{([a-z]+)\}")
_PATTERN_RE = re.compile(r"\{(d\d|a|brg)\}")
_WORD_RE = re.compile(r"[A-Za-z]+")


@functools.cache
def _zipf(n: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** _ZIPF_EXPONENT
    return weights / weights.sum()


def _check_vocabulary() -> None:
    templates = _TEMPLATES + _NOVEL_TEMPLATES + _CLAUSES
    slot_labels = {m.group(1) for t in templates for m in _SLOT_RE.finditer(t) if m.group(1)}
    unknown = slot_labels - set(ENTITY_LABELS)
    if unknown:
        raise ValueError(f"templates use labels {sorted(unknown)} not in {ENTITY_LABELS_PATH}")


_check_vocabulary()


# --------------------------------------------------------------------------------------------
# Sites
# --------------------------------------------------------------------------------------------


def site_vocabulary(name: str, index: int, seed: int = 0, drifted: bool = False) -> SiteVocabulary:
    """The vocabulary of the index-th site for a seed, before or after its drift event.

    The site's own draws (which templates and components it uses, its noise rates) come from
    `(seed, index)` alone, so the drifted vocabulary extends the same site's, not another one's.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index, 0x3E7A])
    variant = index % N_VARIANTS

    def ranked(bank: tuple[str, ...], size: int | None = None) -> tuple[str, ...]:
        # A site-specific order: items are drawn by rank (Zipf), so each site has its own common
        # words and its own long tail.
        order = rng.permutation(len(bank))[: size or len(bank)]
        return tuple(bank[i] for i in order)

    templates = ranked(_TEMPLATES, _SITE_TEMPLATES)
    components = ranked(_COMPONENTS, round(len(_COMPONENTS) * _SITE_COMPONENT_SHARE))

    def jitter(rate: float) -> float:
        return float(min(1.0, rate * rng.uniform(0.75, 1.25)))

    banks = {
        "asset": ranked(_ASSETS[variant]),
        "component": components,
        "failure": ranked(_FAILURES),
        "action": ranked(_ACTIONS),
        "part": ranked(_PARTS),
        "template": templates,
    }
    rates = {
        "abbreviation_rate": jitter(_ABBREVIATION_RATE[variant]),
        "typo_rate": jitter(_TYPO_RATE[variant]),
        "shouting_rate": jitter(_SHOUTING_RATE[variant]),
        "capitalize_rate": jitter(0.3),
        "noun_rate": jitter(_NOUN_RATE[variant]),
        "lower_tag_rate": jitter(_LOWER_TAG_RATE[variant]),
        "unit_space_rate": jitter(_UNIT_SPACE_RATE[variant]),
        "decimal_comma_rate": jitter(_DECIMAL_COMMA_RATE[variant]),
    }
    novel: dict[str, tuple[str, ...]] = {kind: () for kind in banks}
    shorthand = dict(_SHORTHAND)
    if drifted:
        # Drawn after everything above, so the drifted vocabulary keeps the site's pre-drift banks.
        novel = {
            "asset": ranked(_NOVEL_ASSETS[variant]),
            "component": ranked(_NOVEL_COMPONENTS),
            "failure": ranked(_NOVEL_FAILURES),
            "action": ranked(_NOVEL_ACTIONS),
            "part": ranked(_NOVEL_PARTS),
            "template": ranked(_NOVEL_TEMPLATES),
        }
        # The new shorthand crowds out the old for the same word: the new CMMS autocompletes it.
        shorthand.update(_NOVEL_SHORTHAND)
    return SiteVocabulary(
        name=name,
        index=index,
        seed=seed,
        variant=variant,
        drifted=drifted,
        banks=banks,
        novel=novel,
        novel_share=_NOVEL_SHARE if drifted else 0.0,
        shorthand=shorthand,
        **rates,
    )


def default_site_vocabularies(n_sites: int = 3, seed: int = 0) -> list[SiteVocabulary]:
    """`n_sites` pre-drift vocabularies named site0.. (the names `tools.simulate` uses)."""
    if n_sites < 1:
        raise ValueError("n_sites must be >= 1")
    return [site_vocabulary(f"site{i}", i, seed) for i in range(n_sites)]


# --------------------------------------------------------------------------------------------
# Composing one work order
# --------------------------------------------------------------------------------------------

# A work order under construction: (text, label or None for filler) pieces, joined at the end so
# that every transformation before it can change lengths without breaking offsets.
_Piece = list[Any]  # [text, label | None]


class _Writer:
    """Writes work orders for one vocabulary from a shared generator."""

    def __init__(self, vocab: SiteVocabulary, rng: np.random.Generator) -> None:
        self.vocab = vocab
        self.rng = rng

    def _pick(self, kind: str) -> str:
        rng = self.rng
        bank, novel = self.vocab.banks[kind], self.vocab.novel[kind]
        if novel and rng.random() < self.vocab.novel_share:
            bank = novel
        return bank[int(rng.choice(len(bank), p=_zipf(len(bank))))]

    def _pattern(self, pattern: str) -> str:
        rng = self.rng

        def slot(m: re.Match[str]) -> str:
            name = m.group(1)
            if name == "a":
                return "ABC"[int(rng.integers(3))]
            if name == "brg":
                suffix = ("-2RS", "-2Z", "ZZ", "-2RS1", "", "/C3")[int(rng.integers(6))]
                return f"{int(rng.choice([60, 62, 63]))}{int(rng.integers(0, 20)):02d}{suffix}"
            digits = int(name[1])
            if digits == 1:
                return str(int(rng.integers(1, 10)))
            if digits == 2:
                return f"{int(rng.integers(1, 100)):02d}"
            return str(int(rng.integers(10 ** (digits - 1), 10**digits)))

        return _PATTERN_RE.sub(slot, pattern)

    def _asset(self) -> str:
        rng = self.rng
        noun, _, tag = self._pick("asset").rpartition(" ")
        tag = self._pattern(tag)
        if rng.random() < self.vocab.lower_tag_rate:
            tag = tag.lower()
        if noun and rng.random() < self.vocab.noun_rate:
            return f"{noun} {tag}"
        return tag

    def _quantity(self, kind: str) -> str:
        rng, vocab = self.rng, self.vocab
        units = _UNITS[kind]
        if vocab.drifted and rng.random() < vocab.novel_share:
            units = _NOVEL_UNITS[kind]
        unit, low, high, decimals = units[int(rng.integers(len(units)))]
        value = _uniform(rng, low, high, decimals)
        if decimals and rng.random() < vocab.decimal_comma_rate:
            value = value.replace(".", ",")
        if unit == "x":  # "2x" is how a count is written
            return f"{value}x"
        space = " " if rng.random() < vocab.unit_space_rate else ""
        return f"{value}{space}{unit}"

    def _entity(self, label: str, kind: str | None) -> str:
        if label == "ASSET":
            return self._asset()
        if label == "QUANTITY":
            return self._quantity(kind or "pressure")
        if label == "PART":
            return self._pattern(self._pick("part"))
        value = self._pick(label.lower())
        if label != "COMPONENT":
            return value
        rng = self.rng
        if rng.random() < _SUBPART_RATE:
            subpart = _SUBPARTS[int(rng.integers(len(_SUBPARTS)))]
            if not value.endswith(subpart):
                value = f"{value} {subpart}"
        if rng.random() < _MODIFIER_RATE:
            value = f"{_COMPONENT_MODIFIERS[int(rng.integers(len(_COMPONENT_MODIFIERS)))]} {value}"
        return value

    def _filler(self, name: str) -> str:
        if name == "wo":
            return str(int(self.rng.integers(100000, 1000000)))
        if name == "approx":
            return _APPROX[int(self.rng.integers(len(_APPROX)))]
        if name == "ref":
            return self._pattern(_REFERENCES[int(self.rng.integers(len(_REFERENCES)))])
        raise ValueError(f"unknown filler slot {{{name}}}")

    def _narrative(self) -> str:
        """A template made up on the spot: the asset, then one to three clauses as they come."""
        rng = self.rng
        n = int(rng.integers(1, 4))
        clauses = [_CLAUSES[int(i)] for i in rng.choice(len(_CLAUSES), size=n, replace=False)]
        joints = [(", ", "; ", ". ", " - ", " then ", " + ")[int(rng.integers(6))] for _ in clauses]
        body = "".join(j + c for j, c in zip(joints, clauses, strict=True))
        if rng.random() < 0.3:
            return body[len(joints[0]) :] + (" on ", " at ", " - ", ", ")[int(rng.integers(4))] + "{ASSET}"
        return "{ASSET}" + (": " if rng.random() < 0.4 else joints[0]) + body[len(joints[0]) :]

    def pieces(self) -> list[_Piece]:
        rng = self.rng
        template = self._narrative() if rng.random() < _NARRATIVE_RATE else self._pick("template")
        pieces: list[_Piece] = []
        at = 0
        for m in _SLOT_RE.finditer(template):
            if m.start() > at:
                pieces.append([template[at : m.start()], None])
            if m.group(1):
                label = m.group(1)
                self._qualifier(label, pieces)
                value = self._entity(label, m.group(2))
                for _ in range(4):  # "bearing and bearing" is no work order: a second slot differs
                    if all(value.lower() != text.lower() for text, other in pieces if other == label):
                        break
                    value = self._entity(label, m.group(2))
                pieces.append([value, label])
            else:
                pieces.append([self._filler(m.group(3)), None])
            at = m.end()
        if at < len(template):
            pieces.append([template[at:], None])
        if rng.random() < _FOLLOWUP_RATE:
            followup = _FOLLOWUPS[int(rng.integers(len(_FOLLOWUPS)))]
            joint = (", ", ". ", " - ", "; ")[int(rng.integers(4))]
            followup = self._pattern(_SLOT_RE.sub(lambda m: self._filler(m.group(3)), followup))
            pieces.append([joint + followup, None])
        return pieces

    def _qualifier(self, label: str, pieces: list[_Piece]) -> None:
        """Maybe a word outside the entity about to be written: "old" seal, "badly" worn."""
        rng = self.rng
        if not pieces or not pieces[-1][0].endswith(" "):
            return
        if label in ("COMPONENT", "PART") and rng.random() < _DETERMINER_RATE:
            pieces.append([_DETERMINERS[int(rng.integers(len(_DETERMINERS)))], None])
        elif label == "FAILURE" and rng.random() < _DEGREE_RATE:
            pieces.append([_DEGREES[int(rng.integers(len(_DEGREES)))], None])

    def _abbreviate(self, pieces: list[_Piece]) -> None:
        rng, vocab = self.rng, self.vocab

        def shorten(m: re.Match[str]) -> str:
            word = m.group(0)
            options = vocab.shorthand.get(word.lower())
            if not options or rng.random() >= vocab.abbreviation_rate:
                return word
            return options[int(rng.integers(len(options)))]

        for piece in pieces:
            piece[0] = _WORD_RE.sub(shorten, piece[0])

    def _misspell(self, pieces: list[_Piece]) -> None:
        rng = self.rng
        if rng.random() >= self.vocab.typo_rate:
            return
        # Letters-only words of five or more, so a tag or part number is never misspelt into another.
        words = [
            (i, m.start(), m.end())
            for i, piece in enumerate(pieces)
            for m in re.finditer(r"(?<![\w'])[A-Za-z]{5,}(?![\w'])", piece[0])
        ]
        if not words:
            return
        chosen = rng.permutation(len(words))[: int(rng.integers(1, 3))]
        # Right to left within a piece, so the earlier positions stay valid.
        for k in sorted(chosen.tolist(), key=lambda k: (words[k][0], -words[k][1])):
            i, start, end = words[k]
            text = pieces[i][0]
            pieces[i][0] = text[:start] + _typo(text[start:end], rng) + text[end:]

    def write(self) -> tuple[str, tuple[Span, ...]]:
        rng, vocab = self.rng, self.vocab
        pieces = self.pieces()
        self._abbreviate(pieces)
        self._misspell(pieces)
        if rng.random() < vocab.shouting_rate:
            for piece in pieces:
                piece[0] = piece[0].upper()
        elif rng.random() < vocab.capitalize_rate:
            first = pieces[0][0]
            pieces[0][0] = first[:1].upper() + first[1:]
        parts: list[str] = []
        spans: list[Span] = []
        at = 0
        for text, label in pieces:
            if label is not None:
                spans.append((at, at + len(text), label))
            parts.append(text)
            at += len(text)
        return "".join(parts), tuple(spans)


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------


class WorkOrderStream:
    """Work orders from several sites in time order; records with index >= `drift_at` are drifted.

    `sites` is a number of default sites or a list of pre-drift vocabularies; each site switches to
    its drifted vocabulary (`site_vocabulary(..., drifted=True)`) at the same point of the stream.
    Iterating never ends; `take(n)` continues where the last call ended.
    """

    def __init__(
        self, seed: int = 0, sites: int | Sequence[SiteVocabulary] = 3, drift_at: int | None = None
    ) -> None:
        if drift_at is not None and drift_at < 0:
            raise ValueError(f"drift_at must be >= 0, got {drift_at}")
        vocabs = default_site_vocabularies(sites, seed) if isinstance(sites, int) else list(sites)
        if not vocabs:
            raise ValueError("sites must not be empty")
        if any(v.drifted for v in vocabs):
            raise ValueError("pass pre-drift vocabularies; the stream drifts them at drift_at")
        self.seed = seed
        self.drift_at = drift_at
        self.sites = vocabs
        self._rng = np.random.default_rng([seed, 0x3E7A])
        drifted = [site_vocabulary(v.name, v.index, v.seed, drifted=True) for v in vocabs]
        self._writers = {
            False: [_Writer(v, self._rng) for v in vocabs],
            True: [_Writer(v, self._rng) for v in drifted],
        }
        self._index = 0
        self._ts = 0.0

    def __iter__(self) -> Iterator[WorkOrder]:
        while True:
            yield self._next()

    def take(self, n: int) -> list[WorkOrder]:
        """The next `n` work orders."""
        return [self._next() for _ in range(n)]

    def _next(self) -> WorkOrder:
        rng = self._rng
        drifted = self.drift_at is not None and self._index >= self.drift_at
        self._index += 1
        self._ts += float(rng.exponential(_MEAN_GAP_S))
        writer = self._writers[drifted][int(rng.integers(len(self.sites)))]
        text, spans = writer.write()
        return WorkOrder(
            text=text, entities=spans, site=writer.vocab.name, ts=round(self._ts, 3), drifted=drifted
        )


def workorder_dataset(n: int, seed: int = 0, sites: int = 3, drift: bool = False) -> list[WorkOrder]:
    """`n` work orders from `sites` default sites in time order.

    With `drift=True` the stream drifts halfway, so the later half is drifted; select on
    `WorkOrder.drifted`.
    """
    return WorkOrderStream(seed, sites, drift_at=n // 2 if drift else None).take(n)


def to_payload(wo: WorkOrder, id: str | None = None) -> dict[str, Any]:
    """The JSON body a device sends: a message id (fresh unless given), the text and its spans."""
    return {
        "id": id or str(uuid.uuid4()),
        "text": wo.text,
        "entities": [{"start": s, "end": e, "label": label} for s, e, label in wo.entities],
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

# Ids of the JSONL dump derive from seed and index, so the same command writes the same file.
_DUMP_NAMESPACE = uuid.UUID("6f1d0c1e-3b7a-4c55-9a51-2f0f2c8e7d10")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.workorders", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="number of work orders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sites", type=int, default=3, help="number of default sites")
    p.add_argument("--drift-at", type=int, default=None, help="index of the first drifted work order")
    p.add_argument("--jsonl", type=Path, default=None, help="write JSON lines here instead of stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tools.workorders`: JSON lines of {id, text, entities, site, drifted}."""
    args = _parser().parse_args(argv)
    if args.n < 0 or args.sites < 1:
        print("--n must be >= 0 and --sites >= 1", file=sys.stderr)
        return 2
    stream = WorkOrderStream(args.seed, args.sites, args.drift_at)
    out = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else sys.stdout  # noqa: SIM115
    try:
        for i, wo in enumerate(stream.take(args.n)):
            payload = to_payload(wo, id=str(uuid.uuid5(_DUMP_NAMESPACE, f"{args.seed}:{i}")))
            payload.update(site=wo.site, drifted=wo.drifted)
            out.write(json.dumps(payload, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
