"""The block-wise 8-bit quantizer (registry/quant8.py): round-trip bound, block handling, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimtrain.registry.quant8 import codebook, dequantize, max_gap, n_blocks, nearest_codes, quantize

shapes = st.one_of(
    st.tuples(st.integers(1, 700)),
    st.tuples(st.integers(1, 5), st.integers(1, 700)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 300)),
)


def _block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Independent per-element absmax of the element's block (row-aligned blocks on the last dim)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for start in range(0, rows.shape[1], block):
        part = rows[:, start:start + block]
        out[:, start:start + block] = part.abs().amax(dim=1, keepdim=True)
    return out.reshape(x.shape)


@given(shape=shapes, block=st.sampled_from([1, 7, 64, 256]), kind=st.sampled_from(["dynamic", "linear"]),
       signed=st.booleans(), seed=st.integers(0, 2**16), log_scale=st.floats(-8, 3))
def test_round_trip_within_half_a_code_gap_of_the_block_scale(shape, block, kind, signed, seed, log_scale):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10.0 ** log_scale
    if not signed:
        x = x.abs()
    q = quantize(x, signed=signed, kind=kind, block_size=block)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape
    assert q.scales.shape == (*shape[:-1], n_blocks(shape[-1], block))
    y = dequantize(q.codes, q.scales, signed=signed, kind=kind, block_size=block)
    bound = _block_absmax(x, block) * (max_gap(kind, signed) / 2 + 1e-6)
    assert torch.all((y - x).abs() <= bound)


@given(last=st.integers(1, 600), block=st.sampled_from([5, 256]))
def test_each_block_has_its_own_scale_also_the_short_tail(last, block):
    # one big entry per block: each block's scale is its own absmax, so the tail block (shorter when
    # ``last`` is not a multiple of ``block``) keeps small values exact at its own scale
    x = torch.full((2, last), 1e-3)
    x[:, ::block] = torch.arange(1, n_blocks(last, block) + 1, dtype=torch.float32)
    q = quantize(x, signed=True, block_size=block)
    assert torch.equal(q.scales[0], torch.arange(1, n_blocks(last, block) + 1, dtype=torch.float32))
    y = dequantize(*q, signed=True, block_size=block)
    assert torch.allclose(y[:, ::block], x[:, ::block])  # absmax entries are code +-1: exact


def test_zero_blocks_stay_zero_and_bf16_output():
    x = torch.zeros(3, 300)
    x[1, 260] = -2.0
    q = quantize(x, signed=True)
    y = dequantize(*q, signed=True, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y.float(), x)


def test_codebooks_are_sorted_and_hold_the_ends():
    for kind in ("dynamic", "linear"):
        s, u = codebook(kind, True), codebook(kind, False)
        assert len(s) == 255 and len(u) == 256
        assert torch.all(s[1:] > s[:-1]) and torch.all(u[1:] > u[:-1])
        assert s[0] == -1 and s[127] == 0 and s[-1] == 1 and u[0] == 0 and u[-1] == 1


def test_dynamic_map_is_finer_near_zero_than_linear():
    x = torch.tensor([[1.0] + [1e-3] * 255])
    err = {k: (dequantize(*quantize(x, signed=True, kind=k), signed=True, kind=k) - x)[0, 1:].abs().max()
           for k in ("dynamic", "linear")}
    assert err["dynamic"] < err["linear"] / 5


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_block_size_is_refused(bad):
    with pytest.raises(ValueError, match="block_size"):
        quantize(torch.ones(4), signed=True, block_size=bad)


def test_bad_map_is_refused():
    with pytest.raises(ValueError, match="allowed: dynamic, linear"):
        quantize(torch.ones(4), signed=True, kind="log")


@given(rows=st.integers(2, 40), last=st.integers(1, 600), cut=st.integers(1, 39), block=st.sampled_from([7, 256]),
       signed=st.booleans(), seed=st.integers(0, 2**16))
def test_quantizing_row_shards_equals_quantizing_the_whole(rows, last, cut, block, signed, seed):
    """FSDP2 keeps a state tensor as row shards (Shard(0)) and each rank quantizes its own rows: the
    codes and scales must be the unsharded ones, bit for bit, wherever the cut falls."""
    cut = min(cut, rows - 1)
    x = torch.randn((rows, last), generator=torch.Generator().manual_seed(seed))
    if not signed:
        x = x.abs()
    whole = quantize(x, signed=signed, kind="dynamic", block_size=block)
    parts = [quantize(part, signed=signed, kind="dynamic", block_size=block) for part in (x[:cut], x[cut:])]
    assert torch.equal(torch.cat([p.codes for p in parts]), whole.codes)
    assert torch.equal(torch.cat([p.scales for p in parts]), whole.scales)


@given(kind=st.sampled_from(["dynamic", "linear"]), signed=st.booleans(), seed=st.integers(0, 2**16),
       log_scale=st.floats(-12, 0))
def test_nearest_codes_equal_a_binary_search_over_the_midpoints(kind, signed, seed, log_scale):
    """The closed-form code search against the plain statement: the number of code midpoints below
    the value (torch.bucketize), on random values, the codebook entries and the midpoints themselves."""
    cb = codebook(kind, signed)
    mids = (cb[1:] + cb[:-1]) * 0.5
    x = (torch.rand(4000, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * 10.0 ** log_scale
    x = torch.cat([x, cb, mids, torch.nextafter(mids, torch.full_like(mids, 2.0)),
                   torch.nextafter(mids, torch.full_like(mids, -2.0))]).clamp(-1.0, 1.0)
    if not signed:
        x = x.abs()
    assert torch.equal(nearest_codes(x, kind, signed), torch.bucketize(x, mids).to(torch.uint8))


@given(signed=st.booleans(), seed=st.integers(0, 2**16), log_scale=st.floats(-12, 0))
def test_the_code_table_gives_the_codes_of_a_binary_search(signed, seed, log_scale):
    """quant8.code_table (the fused CPU loop's codes: two reads and one comparison) against
    torch.bucketize, on random values, the code values, the midpoints and their float neighbours, 0,
    -0 and the ends; the linear map has no table (its midpoints near 1 lie closer than a bucket)."""
    from slimtrain.registry.quant8 import code_table, table_codes

    cb = codebook("dynamic", signed)
    mids = (cb[1:] + cb[:-1]) * 0.5
    x = (torch.rand(4000, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * 10.0 ** log_scale
    x = torch.cat([x, cb, mids, torch.nextafter(mids, torch.full_like(mids, 2.0)),
                   torch.nextafter(mids, torch.full_like(mids, -2.0)), torch.tensor([0.0, -0.0, 1.0, -1.0])])
    x = x.clamp(-1.0, 1.0)
    if not signed:
        x = x.abs()
    want = torch.bucketize(x, mids).to(torch.uint8)
    assert torch.equal(table_codes(x, *code_table("dynamic", signed)), want)
    assert torch.equal(nearest_codes(x, "dynamic", signed), want)
    assert code_table("linear", signed) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_entry_decodes_its_block_non_finite_and_leaves_other_blocks(bad):
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    x[0, 1] = bad
    q = quantize(x, signed=True, kind="dynamic", block_size=3)
    y = dequantize(q.codes, q.scales, signed=True, kind="dynamic", block_size=3)
    assert not torch.isfinite(y[0, :3]).all()
    assert torch.isfinite(y[0, 3:]).all() and torch.isfinite(y[1]).all()
    assert torch.allclose(y[1], x[1], atol=max_gap("dynamic", True))


@pytest.mark.parametrize("sqrt", [False, True])
def test_chunked_encoding_and_decoding_equal_one_pass(monkeypatch, sqrt):
    """Rows go through the codec CHUNK_ELEMENTS at a time (bounded temporaries): any chunking gives
    the one-pass codes, scales and decoded values bit for bit, and sqrt/square round-trip v."""
    import slimtrain.registry.quant8 as q8

    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(5)).abs() * 1e-4
    whole = quantize(x, signed=not sqrt, block_size=64, sqrt=sqrt)
    back = dequantize(whole.codes, whole.scales, signed=not sqrt, block_size=64, square=sqrt)
    for chunk in (1, 300, 301, 4000):
        monkeypatch.setattr(q8, "CHUNK_ELEMENTS", chunk)
        part = quantize(x, signed=not sqrt, block_size=64, sqrt=sqrt)
        assert torch.equal(part.codes, whole.codes) and torch.equal(part.scales, whole.scales)
        assert torch.equal(dequantize(part.codes, part.scales, signed=not sqrt, block_size=64, square=sqrt), back)
    rel = ((back - x).abs() / x.abs().clamp_min(1e-12)).median()
    assert rel < 0.05
