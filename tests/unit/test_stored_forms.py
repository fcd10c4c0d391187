"""int4r chunks a load takes in their stored form (kvtier.deferred.StoredForm): only when it
asks for them, never paired with another tier's chunk, and decoded before a chunk moves to
an accelerator (found in review; each test failed before its fix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier import codec, quant
from kvtier.chunk import KVChunk
from kvtier.codec import Compression
from kvtier.deferred import StoredForm
from kvtier.integrations.vllm import paged
from kvtier.integrations.vllm.loader import Loader
from kvtier.integrations.vllm.messages import LoadSpec
from kvtier.integrations.vllm.paged import PagedLayer, block_view, chunks_to_blocks, gather_chunks
from kvtier.keys import Namespace
from kvtier.store import TieredStore
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.memory import MemoryTier

NS = Namespace("m", kv_dtype="float32")
CHUNK = 32


def test_stored_forms_come_only_to_a_caller_that_asks_for_them(tmp_path: Path) -> None:
    comps = [Compression.NONE, Compression.INT4R]
    tokens = list(range(2 * CHUNK))
    kv = [torch.randn(2, 2, CHUNK, 2, 64) for _ in range(2)]

    def store() -> TieredStore:
        disk = DiskTier(tmp_path / "d", 1 << 30, fsync=False)
        return TieredStore([MemoryTier(1 << 28), disk], CHUNK, compression=comps)

    with store() as s:
        s.put(tokens, NS, [KVChunk.from_array(c.numpy()) for c in kv])
    with store() as s:  # check_payload=False alone: decoded here, promoted raw
        got = s.get(tokens, NS, check_payload=False)
        assert got.tiers == ["disk"] * 2 and not any(isinstance(c, StoredForm) for c in got.checks)
        back = torch.frombuffer(bytearray(got.chunks[0].data), dtype=torch.float32)
        assert (back.view(kv[0].shape) - kv[0]).abs().max() < 1.0  # KV, not a placeholder
        held = s.tiers[0].get_many(s.keys(tokens, NS))
        assert {codec.read_header(b).compression for b in held} == {Compression.NONE}  # type: ignore[arg-type]
    with store() as s:  # and asked for: stored forms, kept so in DRAM
        sizes = [kv[0].numel() * 4] * 2
        got = s.get(tokens, NS, payload_bytes=sizes, check_payload=False, stored_forms=True)
        assert all(isinstance(c, StoredForm) for c in got.checks)


def test_a_stored_form_of_another_shape_is_never_paired_with_a_lower_tiers_chunk(
    tmp_path: Path,
) -> None:
    """DRAM holds an int4r chunk of another shape under the key (a namespace missing
    something that changes the shape); the disk's raw chunk is the one loaded, as it is."""
    tokens = list(range(CHUNK))
    right = torch.randn(2, 2, CHUNK, 2, 64)
    other = torch.randn(2, 2, CHUNK, 1, 64)
    with TieredStore([MemoryTier(1 << 28), DiskTier(tmp_path / "d", 1 << 30)], CHUNK) as s:
        s.put(tokens, NS, [KVChunk.from_array(right.numpy())])
    with TieredStore([MemoryTier(1 << 28), DiskTier(tmp_path / "d", 1 << 30)], CHUNK) as s:
        key = s.keys(tokens, NS)[0]
        wrong = KVChunk.from_array(other.numpy())
        s.tiers[0].put_many([(key, codec.encode(key, wrong, NS.id(CHUNK), Compression.INT4R))])
        cache = [torch.zeros(16, 2, 16, 2 * 64) for _ in range(2)]
        layers = [block_view(t, 2, 64, False) for t in cache]
        loader = Loader(s, layers, CHUNK, lambda _: NS, lambda keys: None)
        loader.load(LoadSpec("r", tokens, None, [3, 4], 0, len(tokens)))
        assert loader.reports()[0]["loaded"] == {"disk": CHUNK}
        placed = torch.empty(right.shape)
        gather_chunks(layers, [3, 4], [placed])
        assert torch.equal(placed, right)
        loader.close()


def test_a_stored_form_is_decoded_before_its_chunk_moves_to_an_accelerator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU engine the chunk is copied to the device before its blocks are written: an
    int4r chunk is decoded into its host buffer first. Simulated on the CPU: a device whose
    copies are clones, as a host-to-GPU copy is."""

    class Accelerator:
        type = "cuda"

    monkeypatch.setattr(PagedLayer, "device", property(lambda self: Accelerator()))
    to = torch.Tensor.to

    def copy_to(self: torch.Tensor, device: object, *args: object, **kwargs: object) -> object:
        return (
            self.clone() if isinstance(device, Accelerator) else to(self, device, *args, **kwargs)
        )  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "to", copy_to)
    monkeypatch.setattr(paged, "_copy", lambda pairs, device: [d.copy_(s) for d, s in pairs])
    shape = (2, 2, CHUNK, 2, 64)
    stored = quant.encode("int4r", torch.randn(shape))
    want = quant.decode("int4r", stored, shape, torch.float32)
    cache = [torch.zeros(64, 2, 16, 2, 64) for _ in range(2)]
    layers = [block_view(t, 2, 64, False) for t in cache]
    form = StoredForm("int4r", "float32", shape, memoryview(stored.numpy()))
    holder = torch.from_numpy(np.zeros(want.numel(), np.float32)).view(shape)  # no KV yet
    assert chunks_to_blocks([holder], layers, [3, 4], checks=[form]) == 1
    placed = torch.empty(shape)
    gather_chunks(layers, [3, 4], [placed])
    assert torch.equal(placed, want)
