"""Replay any labeled CSV as device streams over MQTT.

Each row becomes a labeled sample, `{"id", "text", "label", "ts"}` at QoS 1 on
`edge/{site}/{device}/samples`, one topic per site (from `--site-col`, else "site0"). With
`--time-col` the gaps between rows are honoured, divided by `--speed`; without it, or with
`--speed 0`, rows go out as fast as the broker acknowledges them.

    python -m tools.replay work_orders.csv --text-col description --label-col category \\
        --time-col created --site-col plant --broker localhost --port 1883 --speed 60

`load_csv` is the reusable part: benchmarks read the same CSVs through it. For entity recognition,
`load_conll` (one token per line, BIO or BIOES/BILOU tags) and `load_span_jsonl` (texts with
character-offset spans) read annotated corpora into `(text, [(start, end, label), ...])` pairs, the
form `tools.workorders` and `tools.bench.crf` use.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.simulate import (
    EXIT_BAD_INPUT,
    EXIT_BROKER_UNAVAILABLE,
    DryRunPublisher,
    LabeledText,
    MqttSamplePublisher,
    check_topic_level,
    sample_payload,
    samples_topic,
)

__all__ = [
    "CsvFormatError",
    "ConllFormatError",
    "SpanFormatError",
    "EntityExample",
    "load_csv",
    "load_conll",
    "load_span_jsonl",
    "main",
]

log = logging.getLogger(__name__)

DEFAULT_SITE = "site0"


class CsvFormatError(ValueError):
    """A CSV that cannot be replayed: a missing column or a bad row, named in the message."""


class ConllFormatError(ValueError):
    """A CoNLL file that cannot be read: the line number and what is wrong are in the message."""


class SpanFormatError(ValueError):
    """A span JSONL file that cannot be read: the line number and what is wrong are in the message."""


# A text and its entity spans, sorted by start: text[start:end] is the entity.
EntityExample = tuple[str, list[tuple[int, int, str]]]


def _parse_time(raw: str) -> float:
    """Epoch or relative seconds, or an ISO 8601 timestamp (naive ones are taken as UTC)."""
    try:
        return float(raw)
    except ValueError:
        pass
    parsed = dt.datetime.fromisoformat(raw)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def load_csv(
    path: str | Path,
    text_col: str,
    label_col: str,
    time_col: str | None = None,
    site_col: str | None = None,
    delimiter: str = ",",
) -> list[LabeledText]:
    """Rows of a labeled CSV as `LabeledText`, in file order.

    `ts` is seconds since the earliest row's time when `time_col` is given (so it is monotone only if
    the file is sorted by time), else 0.0. `site` comes from `site_col`, else "site0". `drifted` is
    False. Raises `CsvFormatError` naming the missing column or the bad row (by line number).
    """
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheet exports start with a BOM
        reader = csv.reader(f, delimiter=delimiter)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise CsvFormatError(f"{path}: no header row")
        wanted = {
            "--text-col": text_col,
            "--label-col": label_col,
            "--time-col": time_col,
            "--site-col": site_col,
        }
        missing = [
            f"{column!r} ({option})" for option, column in wanted.items() if column and column not in header
        ]
        if missing:
            raise CsvFormatError(
                f"{path}: column {', '.join(missing)} not in header; columns are: {', '.join(header)}"
            )
        position = {name: i for i, name in enumerate(header)}
        rows: list[tuple[str, str, str, float]] = []
        for fields in reader:
            if not fields:
                continue  # blank line
            where = f"{path}: line {reader.line_num}"
            if len(fields) != len(header):
                raise CsvFormatError(
                    f"{where}: {len(fields)} fields, header has {len(header)} (unquoted delimiter in a text?)"
                )
            text = fields[position[text_col]].strip()
            label = fields[position[label_col]].strip()
            if not text:
                raise CsvFormatError(f"{where}: empty text in column {text_col!r}")
            if not label:
                raise CsvFormatError(f"{where}: empty label in column {label_col!r}")
            site = DEFAULT_SITE
            if site_col:
                try:
                    site = check_topic_level(fields[position[site_col]].strip(), "site")
                except ValueError as e:
                    raise CsvFormatError(f"{where}: column {site_col!r}: {e}") from None
            when = 0.0
            if time_col:
                raw = fields[position[time_col]].strip()
                try:
                    when = _parse_time(raw)
                except ValueError:
                    raise CsvFormatError(
                        f"{where}: cannot read time {raw!r} in column {time_col!r} (want seconds or ISO 8601)"
                    ) from None
            rows.append((text, label, site, when))
    start = min((when for *_, when in rows), default=0.0)
    return [
        LabeledText(text=text, label=label, site=site, ts=when - start, drifted=False)
        for text, label, site, when in rows
    ]


_TAG_PREFIXES = frozenset("BIESLU")  # B/I (BIO), E/S (BIOES), L/U (BILOU)


def load_conll(path: str | Path) -> list[EntityExample]:
    """Sentences of a CoNLL-style file as `(text, spans)`, in file order.

    One token per line, its tag in the last whitespace-separated column (tab-separated lines split
    on tabs only, so a token may hold spaces), a blank line between sentences; `-DOCSTART-` lines
    are skipped. Tags are `O` or a prefix B-/I- (BIO, IOB1), E-/S- (BIOES) or L-/U- (BILOU) and a
    label. The text is the tokens joined by single spaces, the spans are character offsets into it.
    An I-/E-/L- tag that does not continue an entity of its label starts one (IOB1 files begin
    entities with I-). Raises `ConllFormatError` naming the line of a tag or line it cannot read.
    """
    path = Path(path)
    sentences: list[EntityExample] = []
    tokens: list[str] = []
    spans: list[tuple[int, int, str]] = []
    current: list[Any] | None = None  # [start, end, label] of the entity being read
    at = 0  # length of the text so far

    def close() -> None:
        nonlocal current
        if current is not None:
            spans.append((current[0], current[1], current[2]))
            current = None

    def end_sentence() -> None:
        nonlocal tokens, spans, at
        close()
        if tokens:
            sentences.append((" ".join(tokens), spans))
        tokens, spans, at = [], [], 0

    with open(path, encoding="utf-8-sig") as f:  # -sig: tools on Windows write a BOM
        for line_no, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                end_sentence()
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            fields = [field.strip() for field in fields]
            if fields[0] == "-DOCSTART-":
                end_sentence()
                continue
            where = f"{path}: line {line_no}"
            if len(fields) < 2 or not fields[0] or not fields[-1]:
                raise ConllFormatError(f"{where}: want a token and a tag, got {line!r}")
            token, tag = fields[0], fields[-1]
            start = at + (1 if tokens else 0)
            end = start + len(token)
            tokens.append(token)
            at = end
            if tag == "O":
                close()
                continue
            prefix, dash, label = tag.partition("-")
            if not dash or prefix.upper() not in _TAG_PREFIXES or not label:
                raise ConllFormatError(
                    f"{where}: tag {tag!r} is not O or B-/I-/E-/S-/L-/U- followed by a label"
                )
            prefix = prefix.upper()
            continues = current is not None and current[2] == label
            if prefix in "IEL" and continues:
                assert current is not None
                current[1] = end
            else:
                close()
                current = [start, end, label]
            if prefix in "ESLU":  # the entity ends with this token
                close()
    end_sentence()
    return sentences


def _span(entry: Any, text: str, where: str) -> tuple[int, int, str]:
    if isinstance(entry, dict):
        missing = [key for key in ("start", "end", "label") if key not in entry]
        if missing:
            raise SpanFormatError(f"{where}: entity {entry!r} has no {', '.join(missing)}")
        start, end, label = entry["start"], entry["end"], entry["label"]
    elif isinstance(entry, list | tuple) and len(entry) == 3:
        start, end, label = entry
    else:
        raise SpanFormatError(
            f"{where}: entity {entry!r} is neither {{start, end, label}} nor [start, end, label]"
        )
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
        raise SpanFormatError(f"{where}: entity {entry!r}: start and end must be integers")
    if not isinstance(label, str) or not label.strip():
        raise SpanFormatError(f"{where}: entity {entry!r}: label must be a non-empty string")
    if not 0 <= start < end <= len(text):
        raise SpanFormatError(
            f"{where}: entity {entry!r}: want 0 <= start < end <= {len(text)} (the text's length)"
        )
    # Annotation tools often take the space after a word into a span; the entity is the word.
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start == end:
        raise SpanFormatError(f"{where}: entity {entry!r} covers only whitespace")
    return start, end, label.strip()


def load_span_jsonl(path: str | Path) -> list[EntityExample]:
    """Lines of `{"text", "entities"}` as `(text, spans)`, in file order.

    `entities` holds `{"start", "end", "label"}` objects or `[start, end, label]` triples (as
    doccano and label-studio exports write them; the key may also be `label`); other keys (`id`,
    `site`, ...) are ignored and blank lines skipped. Spans are trimmed of surrounding whitespace
    and sorted; overlapping spans, offsets outside the text and lines that are not such JSON raise
    `SpanFormatError` with the line number.
    """
    path = Path(path)
    examples: list[EntityExample] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SpanFormatError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise SpanFormatError(f"{where}: want a JSON object, got {type(record).__name__}")
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                raise SpanFormatError(f"{where}: 'text' must be a non-empty string")
            key = (
                "entities"
                if "entities" in record
                else "label"
                if isinstance(record.get("label"), list)
                else None
            )
            entries = record.get(key, []) if key else []
            if not isinstance(entries, list):
                raise SpanFormatError(f"{where}: '{key}' must be a list")
            spans = sorted(_span(entry, text, where) for entry in entries)
            for (s1, e1, l1), (s2, e2, l2) in zip(spans, spans[1:], strict=False):
                if s2 < e1:
                    raise SpanFormatError(
                        f"{where}: entities {text[s1:e1]!r} ({s1}-{e1} {l1}) and {text[s2:e2]!r}"
                        f" ({s2}-{e2} {l2}) overlap"
                    )
            examples.append((text, spans))
    return examples


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path, help="labeled CSV file")
    p.add_argument("--text-col", required=True)
    p.add_argument("--label-col", required=True)
    p.add_argument("--time-col", default=None, help="seconds or ISO 8601; gaps are honoured")
    p.add_argument("--site-col", default=None, help=f"site per row (topic level); default {DEFAULT_SITE}")
    p.add_argument("--delimiter", default=",")
    p.add_argument("--broker", default="localhost")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--device", default="replay0", help="device name (topic level) for every site")
    p.add_argument("--speed", type=float, default=1.0, help="time-gap divisor; 0 sends as fast as possible")
    p.add_argument("--dry-run", action="store_true", help="print JSON lines to stdout instead of publishing")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m tools.replay`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        records = load_csv(
            args.csv, args.text_col, args.label_col, args.time_col, args.site_col, args.delimiter
        )
        topics = {site: samples_topic(site, args.device) for site in dict.fromkeys(r.site for r in records)}
    except (OSError, ValueError) as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    if args.time_col:
        records.sort(key=lambda r: r.ts)  # stable: rows with the same time keep file order
    log.info("replaying %d records from %s to %s", len(records), args.csv, ", ".join(topics.values()))
    publisher: DryRunPublisher | MqttSamplePublisher
    if args.dry_run:
        publisher = DryRunPublisher()
    else:
        publisher = MqttSamplePublisher(args.broker, args.port, client_id=f"edge-replay-{args.device}")
    paced = bool(args.time_col) and args.speed > 0
    try:
        with publisher:
            started = time.monotonic()
            for record in records:
                if paced:
                    # Against a fixed start, so publish latency does not accumulate into the gaps.
                    time.sleep(max(0.0, started + record.ts / args.speed - time.monotonic()))
                publisher.publish(topics[record.site], sample_payload(record))
    except (ConnectionError, OSError) as e:
        log.error("broker %s:%s: %s", args.broker, args.port, e)
        return EXIT_BROKER_UNAVAILABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
