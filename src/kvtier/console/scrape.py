"""One scrape of one ``/metrics`` page: its samples, and the sums the console needs of them.

A sample is a name (``kvtier:tier_loaded_tokens_total``) and labels; the console adds up what
one engine's labels split (vLLM's ``engine`` and ``model_name``) and keeps only the label it
charts by (``tier``, ``le``, ``reason``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


class ScrapeError(ValueError):
    """A page that is not Prometheus text."""


@dataclass
class Scrape:
    """The samples of one page, by name then labels."""

    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, keep: tuple[str, ...] | None = None) -> Scrape:
        """The samples of ``text``; with ``keep``, only series whose names start with one of
        those (the rest of a vLLM page, some hundreds of samples, is not parsed at all).
        Samples that are not finite numbers are left out (JSON has no NaN)."""
        if keep is not None:
            text = "\n".join(
                line
                for line in text.splitlines()
                if line.startswith(keep) or (line.startswith("#") and _names(line, keep))
            )
        samples: dict[str, dict[Labels, float]] = defaultdict(dict)
        try:
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if math.isfinite(s.value):
                        samples[s.name][tuple(sorted(s.labels.items()))] = float(s.value)
        except ValueError as exc:
            raise ScrapeError(f"not Prometheus text: {exc}") from None
        return cls(dict(samples))

    def total(self, name: str) -> float | None:
        """The sum of all samples named ``name`` (None when there are none)."""
        values = self.samples.get(name)
        return sum(values.values()) if values else None

    def by(self, name: str, label: str) -> dict[str, float]:
        """Samples named ``name`` added up per value of ``label``."""
        out: dict[str, float] = defaultdict(float)
        for labels, value in self.samples.get(name, {}).items():
            key = dict(labels).get(label)
            if key is not None:
                out[key] += value
        return dict(out)

    def by_pair(self, name: str, first: str, second: str) -> dict[tuple[str, str], float]:
        """Samples named ``name`` added up per pair of values of two labels."""
        out: dict[tuple[str, str], float] = defaultdict(float)
        for labels, value in self.samples.get(name, {}).items():
            values = dict(labels)
            if first in values and second in values:
                out[(values[first], values[second])] += value
        return dict(out)

    def lowest(self, name: str, label: str) -> dict[str, float]:
        """The smallest sample named ``name`` per value of ``label`` (a tier is up only where
        every worker says so)."""
        out: dict[str, float] = {}
        for labels, value in self.samples.get(name, {}).items():
            key = dict(labels).get(label)
            if key is not None:
                out[key] = min(value, out.get(key, value))
        return out


def _names(comment: str, keep: tuple[str, ...]) -> bool:
    """A ``# HELP name ...`` or ``# TYPE name ...`` line of a kept series."""
    words = comment.split(maxsplit=3)
    return len(words) > 2 and words[2].startswith(keep)
