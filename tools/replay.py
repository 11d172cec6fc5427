"""Replay any labeled CSV as device streams over MQTT.

Each row becomes a labeled sample, `{"id", "text", "label", "ts"}` at QoS 1 on
`edge/{site}/{device}/samples`, one topic per site (from `--site-col`, else "site0"). With
`--time-col` the gaps between rows are honoured, divided by `--speed`; without it, or with
`--speed 0`, rows go out as fast as the broker acknowledges them.

    python -m tools.replay work_orders.csv --text-col description --label-col category \\
        --time-col created --site-col plant --broker localhost --port 1883 --speed 60

`load_csv` is the reusable part: benchmarks read the same CSVs through it.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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

__all__ = ["CsvFormatError", "load_csv", "main"]

log = logging.getLogger(__name__)

DEFAULT_SITE = "site0"


class CsvFormatError(ValueError):
    """A CSV that cannot be replayed: a missing column or a bad row, named in the message."""


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
