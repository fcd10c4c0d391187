"""The lossy KV codecs: sizes (scales included), round trips within each codec's error bound,
groups that do not fill, and K's outlier channels under int4."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier import quant

SHAPE = (3, 2, 256, 3, 64)  # SmolLM2-135M's heads, three layers


def kv(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(shape)
    x[:, 0, :, :, 5] *= 20  # an outlier channel in K, as real keys have
    return x


@pytest.mark.parametrize(
    ("name", "ratio"),
    [
        ("bf16", 1.0),
        ("int8", 0.516),
        ("int8c", 0.516),
        ("fp8", 0.516),
        ("int4", 0.282),
        ("int4r", 0.297),
        ("k8v4", 0.398),
    ],
)
def test_stored_bytes_per_value_against_bf16(name: str, ratio: float) -> None:
    bf16 = 2 * math.prod(SHAPE)
    assert quant.stored_bytes(name, SHAPE) / bf16 == pytest.approx(ratio, abs=0.001)
    assert quant.encode(name, kv()).numel() == quant.stored_bytes(name, SHAPE)


@pytest.mark.parametrize(("name", "bound"), [("bf16", 0.004), ("int8", 0.005), ("fp8", 0.07)])
def test_8_and_16_bit_codecs_round_trip_within_their_step(name: str, bound: float) -> None:
    x = kv()
    y = quant.decode(name, quant.encode(name, x), SHAPE, torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    # Relative to each head's largest value (the scale's unit).
    rel = (y - x).abs() / x.abs().amax(dim=-1, keepdim=True)
    assert rel.max().item() < bound, rel.max().item()


def test_int8c_scales_k_per_channel_so_an_outlier_channel_coarsens_no_other() -> None:
    x = kv()
    per_token = quant.decode("int8", quant.encode("int8", x), SHAPE, torch.float32)
    per_channel = quant.decode("int8c", quant.encode("int8c", x), SHAPE, torch.float32)
    k = x[:, 0]
    others = [c for c in range(64) if c != 5]
    err_token = (per_token[:, 0] - k)[..., others].abs().max().item()
    err_channel = (per_channel[:, 0] - k)[..., others].abs().max().item()
    assert err_channel < err_token / 5, (err_channel, err_token)  # ~20x outlier: 1/20 the step
    # each K group's error within half its step; V as int8 has it
    groups = k.reshape(3, 4, 64, 3, 64)
    step = groups.abs().amax(2) / 127
    err = (per_channel[:, 0] - k).abs().reshape(3, 4, 64, 3, 64).amax(2)
    assert (err <= 0.51 * step * 1.01 + 1e-6).all()
    assert torch.equal(per_channel[:, 1], per_token[:, 1])


def test_int4_errors_stay_within_half_a_step_of_each_group() -> None:
    x = kv()
    y = quant.decode("int4", quant.encode("int4", x), SHAPE, torch.float32)
    k, v = x[:, 0], x[:, 1]
    # K per channel over 64 tokens: the outlier channel's step is its own, not the others'.
    k_groups = k.reshape(3, 4, 64, 3, 64)
    k_step = (k_groups.amax(2) - k_groups.amin(2)) / 15
    k_err = (y[:, 0] - k).abs().reshape(3, 4, 64, 3, 64).amax(2)
    assert (k_err <= 0.51 * k_step + 1e-6).all()
    v_step = (v.amax(-1) - v.amin(-1)) / 15
    assert ((y[:, 1] - v).abs().amax(-1) <= 0.51 * v_step + 1e-6).all()
    # The outlier channel did not coarsen the others (per-token K would have: step ~20x).
    assert (y[:, 0, :, :, :5] - k[:, :, :, :5]).abs().max() < 0.6


@pytest.mark.parametrize("tokens", [16, 112, 240, 250])  # tails, and a group that does not fill
@pytest.mark.parametrize("name", quant.LOSSY)
def test_short_and_odd_chunks_round_trip(name: str, tokens: int) -> None:
    shape = (2, 2, tokens, 3, 64)
    x = kv(shape, seed=tokens)
    stored = quant.encode(name, x)
    assert stored.numel() == quant.stored_bytes(name, shape)
    y = quant.decode(name, stored, shape, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - x).abs() / x.abs().amax()).max() < 0.1


def test_a_payload_of_the_wrong_size_or_codec_is_refused() -> None:
    stored = quant.encode("int8", kv())
    with pytest.raises(ValueError, match="int4 payload"):
        quant.decode("int4", stored, SHAPE, torch.float32)
    with pytest.raises(ValueError, match="unknown codec 'int3'"):
        quant.encode("int3", kv())


def test_zero_groups_decode_exactly_and_constant_ones_where_the_codec_can() -> None:
    x = torch.zeros(SHAPE)
    x[:, 1, :, 0, :] = 3.5
    for name in quant.LOSSY:
        y = quant.decode(name, quant.encode(name, x), SHAPE, torch.float32)
        assert not y[:, 0].any(), name  # all-zero K: no division by a zero scale
        if name in ("bf16", "int4"):  # 3.5 is a bf16 value, and int4's group minimum
            assert torch.equal(y, x), name
        else:  # a bf16 scale of 3.5 / top: the top level lands within a scale's rounding
            assert (y - x).abs().max() < 0.02, name


def test_fp8_decodes_every_e4m3_value_as_torch_does() -> None:
    """The bit-moving decoder against torch's own conversion, all 254 non-NaN codes."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    shape = (1, 1, 1, 1, codes.numel())
    stored = torch.cat([codes, torch.tensor([1.0]).to(torch.bfloat16).view(torch.uint8)])
    got = quant.decode("fp8", stored, shape, torch.float32).reshape(-1)
    assert torch.equal(got, codes.view(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_8_bit_codes_decode_as_their_exact_product_rounded_once(
    name: str, dtype: torch.dtype
) -> None:
    """Into a bf16 destination the bf16 scales multiply as they are (fast); every dtype gets
    the code times its scale computed exactly and rounded once to the destination's dtype."""
    torch.manual_seed(5)
    shape = (2, 2, 48, 3, 64)
    kv = (torch.randn(shape) * 3).to(dtype)
    stored = quant.encode(name, kv)
    values = kv.numel()
    scale = stored[values:].view(torch.bfloat16).view(*shape[:-1], 1).double()
    codes = stored[:values].view(torch.int8 if name == "int8" else torch.float8_e4m3fn)
    exact = (codes.view(shape).double() * scale).to(dtype)
    assert torch.equal(quant.decode(name, stored, shape, dtype), exact)
