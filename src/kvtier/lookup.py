"""The store's lookups: how many leading tokens of a prompt are cached, and in which tiers
(see :class:`kvtier.store.TieredStore`; reads: :mod:`kvtier.reads`)."""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

from kvtier.hierarchy import Hierarchy
from kvtier.keys import ChunkKey, Namespace, tail_candidates
from kvtier.results import LookupResult
from kvtier.writes import Writes


class Lookups:
    """Lookups over the hierarchy ``h``; keys as ``writes`` makes them."""

    def __init__(self, h: Hierarchy, writes: Writes):
        self.h = h
        self.writes = writes

    def lookup(
        self,
        tokens: Sequence[int] | Any,
        namespace: Namespace,
        held_elsewhere: Container[bytes] = frozenset(),
        granule: int | None = None,
    ) -> LookupResult:
        """How many leading tokens are cached, and where. Never raises for a tier failure.

        ``held_elsewhere`` lists keys the caller knows another process holds (a vLLM
        worker's DRAM tier, mirrored from its events); they count as hits in tier
        ``"elsewhere"``. With ``granule`` (:func:`kvtier.keys.tail_granule`), the longest tail
        stored of a multiple of ``granule`` tokens after the leading run of full chunks counts
        too (a prompt that grew past a stored tail reuses it).
        """
        keys = self.writes.keys(tokens, namespace)
        names = self._run_of(keys, held_elsewhere)
        tail = 0
        if granule:
            candidates = tail_candidates(
                tokens, namespace, self.h.chunk_tokens, granule, keys, after=len(names)
            )
            found = self.h.where([k for _, k in candidates], count_misses=False)
            for (size, key), t in zip(candidates, found, strict=True):
                if t is not None or key in held_elsewhere:
                    names.append("elsewhere" if t is None else self.h.slots[t].tier.name)
                    keys, tail = [*keys[: len(names) - 1], key], size
                    break
        result = LookupResult(keys, names, self.h.chunk_tokens, tail)
        self.h.recorder.lookup(len(tokens), result.hit_tokens)
        return result

    def _run_of(self, keys: list[ChunkKey], held_elsewhere: Container[bytes]) -> list[str]:
        """Tier names of the leading run of ``keys`` held here or elsewhere."""
        if not held_elsewhere:
            return [self.h.slots[t].tier.name for t in self.h.leading(keys)]
        names: list[str] = []
        for key, tier in zip(keys, self.h.locate(keys), strict=True):
            if tier is None and key not in held_elsewhere:
                break
            names.append(tier or "elsewhere")
        return names
