"""Request traces in the Mooncake format, for ``kvtier sim``.

One JSON object a line: ``timestamp`` (ms), ``input_length``, ``output_length`` and
``hash_ids``, the ids of the prompt's 512-token prefix blocks (equal ids: reusable prefix KV).
A malformed line is an error naming its line number, or, with ``skip_bad``, skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.errors import KvtierError

BLOCK_TOKENS = 512


class TraceError(KvtierError):
    """A trace line that is not a valid request."""


@dataclass(frozen=True, slots=True)
class Request:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class Trace:
    requests: list[Request]  # in timestamp order (stable for equal timestamps)
    skipped: int  # malformed lines skipped with skip_bad


def _request(obj: Any) -> Request:
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    ts = obj.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or ts < 0:
        raise ValueError(f"timestamp must be a non-negative number, got {ts!r}")
    lengths = []
    for key in ("input_length", "output_length"):
        value = obj.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        lengths.append(value)
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError("hash_ids must be a list of integers")
    if len(ids) > -(-lengths[0] // BLOCK_TOKENS):
        raise ValueError(
            f"{len(ids)} hash_ids for {lengths[0]} input tokens (blocks of {BLOCK_TOKENS})"
        )
    return Request(float(ts), lengths[0], lengths[1], tuple(ids))


def parse_lines(lines: Iterable[str], source: str, skip_bad: bool = False) -> Trace:
    requests: list[Request] = []
    skipped = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            requests.append(_request(json.loads(line)))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            if not skip_bad:
                raise TraceError(
                    f"{source}:{number}: {exc} (--skip-bad skips such lines and counts them)"
                ) from None
            skipped += 1
    requests.sort(key=lambda r: r.timestamp_ms)
    return Trace(requests, skipped)


def read_trace(path: str | Path, skip_bad: bool = False) -> Trace:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return parse_lines(f, str(path), skip_bad)
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None
