"""FP8 e4m3 codec (fastusp_xdit.comm.fp8) on CPU: format, accuracy, special rows, strides, compile, gloo.

The CUDA (Triton) kernels are checked byte for byte against this CPU implementation by
``benchmarks/fp8_codec.py`` on a GPU.
"""
from __future__ import annotations

import dataclasses
import random
import struct

import pytest
import torch
import torch.distributed as dist

from fastusp_xdit.comm import all_to_all
from fastusp_xdit.comm.fp8 import (FP8Options, check_finite, encoded_row_bytes, fp8_decode,
                                   fp8_encode)
from fastusp_xdit.apps.launch import run_distributed

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
D = 128


def _seed() -> int:
    return random.randrange(2**31)


def _row_rel_err(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (y.double() - x).norm(dim=-1) / x.norm(dim=-1)


def _e4m3_rne(v: torch.Tensor) -> torch.Tensor:
    """Float64 reference of the e4m3fn byte nearest to ``v`` (|v| <= 448), ties to the even code."""
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # +0 ... 448
    mag = v.abs()
    hi = torch.searchsorted(grid, mag).clamp(max=126)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 7)


def _reference_bytes(x: torch.Tensor) -> torch.Tensor:
    """The documented format computed in float64 for finite rows (every fp32 step correctly rounded)."""
    x32 = x.float()
    amax = x32.abs().amax(-1, keepdim=True).double()
    a = amax.clamp_min(2.0**-100)
    inv = (448.0 / a).float().double()  # one correctly rounded fp32 division
    scaled = (x32.double() * inv).float().double().clamp(-448, 448)  # exact product, one rounding
    scale = torch.where(amax == 0, 0.0, a / 448.0).float()
    return torch.cat([_e4m3_rne(scaled), scale.view(torch.uint8)], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_random_rows(dtype):
    seed = _seed()
    x = torch.randn(4, 8, 64, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y = fp8_decode(fp8_encode(x), dtype)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    err = _row_rel_err(y, x)
    rms, worst = err.pow(2).mean().sqrt().item(), err.max().item()
    # e4m3 keeps 3 mantissa bits: measured rms 2.57%, worst row 3.6% over 2048 rows.
    assert 0.02 < rms < 0.028 and worst < 0.045, f"seed {seed}: rms {rms:.4f}, worst row {worst:.4f}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_outlier_rows(dtype):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, 64, D, generator=g)
    outliers = torch.randperm(D, generator=g)[:4]
    x[..., outliers] *= 100
    x = x.to(dtype)
    y = fp8_decode(fp8_encode(x), dtype)
    rest = torch.ones(D, dtype=torch.bool)
    rest[outliers] = False
    err_all = _row_rel_err(y, x)
    err_rest = _row_rel_err(y[..., rest], x[..., rest])
    msg = f"seed {seed}: whole-row worst {err_all.max():.4f}, ordinary channels rms " \
          f"{err_rest.pow(2).mean().sqrt():.4f} worst {err_rest.max():.4f}"
    # 100x outliers leave the ordinary channels in e4m3's normal range: their error stays ~2.6%.
    assert err_all.max() < 0.045 and err_rest.pow(2).mean().sqrt() < 0.03 and err_rest.max() < 0.05, msg


def test_bytes_match_float64_reference():
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, D, generator=g)
    x[0, 0] *= 1e-32  # below the 2**-100 amax floor
    x[0, 2] *= 1e-3  # many values in e4m3's subnormal range once scaled
    x[1, 0, :4] = 0.0
    x[1, 0, :] *= 100  # an outlier row
    # amax 448 makes 448/amax exactly 1: these values sit exactly halfway between e4m3 neighbours.
    ties = torch.tensor([448.0, 21.0, -23.0, 0.5 + 1 / 32, 2.0**-10, 3 * 2.0**-10, -(2.0**-10), 0.0])
    x[2, 0, : ties.numel()] = ties
    # 448/3.9375 as a reciprocal product (torch's ``448 / t``) is 1 ulp off and moves 189/1024 to 22.
    x[3, 0] = torch.tensor([3.9375, 189 / 1024] + [0.0] * (D - 2))
    for dtype in DTYPES:
        xd = x.to(dtype, copy=True)
        xd[0, 1] *= torch.finfo(dtype).max / 2 / xd[0, 1].abs().max()  # huge finite
        got = fp8_encode(xd)
        want = _reference_bytes(xd)
        bad = (got != want).nonzero()
        assert bad.numel() == 0, f"seed {seed}, {dtype}: {len(bad)} bytes differ, first at {bad[0].tolist()}"
    tie_codes = fp8_encode(x[2, 0])[: ties.numel()].view(torch.float8_e4m3fn).float()
    assert tie_codes.tolist() == [448.0, 20.0, -24.0, 0.5, 0.0, 2.0**-8, -0.0, 0.0]
    assert fp8_encode(x[3, 0])[1].view(torch.float8_e4m3fn).item() == 20.0  # 189/1024 * 448/3.9375 = 21


def test_byte_layout():
    seed = _seed()
    x = torch.randn(5, 7, D, generator=torch.Generator().manual_seed(seed)).bfloat16()
    buf = fp8_encode(x)
    assert buf.dtype == torch.uint8 and buf.shape == (5, 7, encoded_row_bytes(D)) == (5, 7, D + 4)
    assert buf.is_contiguous()
    scale = buf[..., D:].contiguous().view(torch.float32).squeeze(-1)
    amax = x.float().abs().amax(-1)
    assert torch.equal(scale, amax / torch.full_like(amax, 448.0)), f"seed {seed}"
    assert bytes(buf[0, 0, D:].tolist()) == struct.pack("<f", scale[0, 0].item()), "little-endian float32"
    values = buf[..., :D].view(torch.float8_e4m3fn).float()
    assert values.abs().amax(-1).eq(448).all(), f"seed {seed}: each row's absmax maps to 448"
    assert encoded_row_bytes(1) == 5
    with pytest.raises(ValueError):
        encoded_row_bytes(0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_decode_to_exact_zeros(dtype):
    seed = _seed()
    x = torch.randn(3, 4, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x[0, 1] = 0
    x[2] = 0
    x[1, 3] = -0.0
    buf = fp8_encode(x)
    zero = x.abs().amax(-1) == 0
    assert torch.equal(buf[..., D:][zero], torch.zeros_like(buf[..., D:][zero])), "zero rows get scale 0"
    y = fp8_decode(buf, dtype)
    assert not y.isnan().any() and (y[zero] == 0).all(), f"seed {seed}"
    assert torch.equal(y[~zero], fp8_decode(fp8_encode(x[~zero]), dtype)), "rows are independent"


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rows_decode_to_nan(dtype):
    seed = _seed()
    x = torch.randn(4, 5, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x[0, 0, 3] = float("inf")
    x[1, 2, 0] = -float("inf")
    x[3, 4, 100] = float("nan")
    bad = ~torch.isfinite(x).all(-1)
    buf = fp8_encode(x)
    assert (buf[..., :D][bad] == 0x7F).all(), "non-finite rows carry e4m3 NaN values"
    assert buf[..., D:][bad].contiguous().view(torch.float32).isnan().all(), "and a NaN scale"
    y = fp8_decode(buf, dtype)
    assert y[bad].isnan().all() and not y[~bad].isnan().any(), f"seed {seed}"
    assert torch.equal(y[~bad], fp8_decode(fp8_encode(x[~bad]), dtype)), "finite rows are unaffected"
    with pytest.raises(ValueError, match="non-finite values.*disable 8-bit communication \\(use backend fastusp\\)"):
        check_finite(x)
    check_finite(x[~bad])


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_give_the_bytes_of_their_contiguous_copy(dtype):
    seed = _seed()
    x = torch.randn(2, 6, 40, D, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (B, H, S, D)
    views = {
        "SBHD permute": x.permute(2, 0, 1, 3),
        "5-dim head split": x.view(2, 2, 3, 40, D).permute(1, 3, 0, 2, 4),
        "sliced heads": x[:, 1::2],
        "narrowed rows": x[..., 3:17, :],
        "1-dim row": x[1, 2, 5],
    }
    for name, v in views.items():
        buf = fp8_encode(v)
        assert buf.is_contiguous() and torch.equal(buf, fp8_encode(v.contiguous())), f"{name}, seed {seed}"
        want = fp8_decode(buf, dtype)
        if buf.dim() >= 2:
            flipped = buf.transpose(0, -2)  # decode reads strided bytes and writes contiguous values
            got = fp8_decode(flipped, dtype)
            assert got.is_contiguous() and torch.equal(got, want.transpose(0, -2)), f"{name}, seed {seed}"


def test_encode_into_a_packed_buffer_slot():
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 8, 3, D, generator=g).bfloat16()  # (B, S, H, D)
    b = torch.randn(5, 2, 64, generator=g).half()
    size_a, size_b = a[0].numel() // D * (D + 4), b.numel() // 64 * 68
    buf = torch.full((7 + size_a + size_b,), 0xAB, dtype=torch.uint8)
    slot_a = buf[7:7 + size_a].view(8, 3, D + 4)  # odd byte offset: no alignment assumed
    slot_b = buf[7 + size_a:].view(5, 2, 68)
    assert fp8_encode(a[1], out=slot_a) is slot_a
    fp8_encode(b, out=slot_b)
    assert torch.equal(slot_a, fp8_encode(a[1])) and torch.equal(slot_b, fp8_encode(b)), f"seed {seed}"
    assert (buf[:7] == 0xAB).all(), "bytes outside the slots stay untouched"
    with pytest.raises(ValueError, match="contiguous uint8 tensor of shape \\(8, 3, 132\\)"):
        fp8_encode(a[1], out=torch.empty(3, 8, D + 4, dtype=torch.uint8).transpose(0, 1))
    with pytest.raises(ValueError, match="contiguous uint8"):
        fp8_encode(a[1], out=torch.empty(8, 3, D, dtype=torch.uint8))
    torch.library.opcheck(torch.ops.fastusp.fp8_encode_into.default, (a[1].transpose(0, 1), slot_a.transpose(0, 1)
                                                                       .contiguous()))


def test_invalid_inputs_raise_value_error():
    x = torch.randn(3, 4, D)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        fp8_encode(x.double())
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        fp8_encode(x.to(torch.int32))
    with pytest.raises(ValueError, match="last-dim stride 1.*contiguous"):
        fp8_encode(x.transpose(-1, -2))
    with pytest.raises(ValueError, match="flatten"):
        fp8_encode(torch.randn(1, 1, 1, 1, 1, 8))
    with pytest.raises(ValueError, match="1 to 5 dims"):
        fp8_encode(torch.tensor(1.0))
    buf = fp8_encode(x)
    with pytest.raises(ValueError, match="uint8"):
        fp8_decode(buf.view(torch.int8), torch.float32)
    with pytest.raises(ValueError, match="D \\+ 4 bytes"):
        fp8_decode(buf[..., :4], torch.float32)
    with pytest.raises(ValueError, match="produces float16/bfloat16/float32"):
        fp8_decode(buf, torch.float64)


def test_custom_ops_fake_impls_and_schemas():
    seed = _seed()
    x = torch.randn(2, 3, 8, 64, generator=torch.Generator().manual_seed(seed)).bfloat16()
    buf = fp8_encode(x)
    torch.library.opcheck(torch.ops.fastusp.fp8_encode.default, (x.permute(2, 0, 1, 3),))
    torch.library.opcheck(torch.ops.fastusp.fp8_decode.default, (buf.permute(1, 0, 2, 3), torch.float16))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fx = torch.empty(5, 1, 24, 72, dtype=torch.float16)
        fb = fp8_encode(fx)
        assert fb.shape == (5, 1, 24, 76) and fb.dtype == torch.uint8
        fy = fp8_decode(fb, torch.bfloat16)
        assert fy.shape == (5, 1, 24, 72) and fy.dtype == torch.bfloat16


def test_compile_fullgraph_matches_eager():
    seed = _seed()
    x = torch.randn(2, 4, 16, 64, generator=torch.Generator().manual_seed(seed)).bfloat16()

    def roundtrip(t):  # the Ulysses pattern: permuted view in, contiguous values out
        buf = fp8_encode((t * 2).permute(2, 0, 1, 3))
        return fp8_decode(buf, torch.bfloat16).permute(1, 2, 0, 3) + 1

    torch._dynamo.reset()
    got = torch.compile(roundtrip, fullgraph=True)(x)
    assert torch.equal(got, roundtrip(x)), f"seed {seed}"


def test_compile_fullgraph_encode_into_slots_matches_eager():
    seed = _seed()
    x = torch.randn(2, 4, 16, 64, generator=torch.Generator().manual_seed(seed)).bfloat16()

    def pack(t):  # two heads groups, each permuted to token-major, packed back to back in one buffer
        buf = torch.empty(2 * 16 * 2 * 2 * 68, dtype=torch.uint8)
        half = buf.numel() // 2
        for j in range(2):
            fp8_encode(t[:, 2 * j:2 * j + 2].permute(2, 0, 1, 3), out=buf[j * half:(j + 1) * half].view(16, 2, 2, 68))
        return buf

    torch._dynamo.reset()
    got = torch.compile(pack, fullgraph=True)(x)
    assert torch.equal(got, pack(x)), f"seed {seed}"


def _a2a_worker(seed: int, rows: int):
    """Each rank encodes its (H, world*rows, D) tensor as a token-major view and exchanges it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    inputs = [torch.randn(3, world * rows, 64, generator=torch.Generator().manual_seed(seed + r)).bfloat16()
              for r in range(world)]
    buf = fp8_encode(inputs[rank].transpose(0, 1))  # (world*rows, H, D + 4)
    recv = all_to_all(buf, [rows] * world, [rows] * world, dist.group.WORLD)
    got = fp8_decode(recv, torch.bfloat16)
    want = torch.cat([fp8_decode(fp8_encode(t.transpose(0, 1)[rank * rows:(rank + 1) * rows]), torch.bfloat16)
                      for t in inputs])
    return torch.equal(got, want), torch.equal(recv, torch.cat(
        [fp8_encode(t.transpose(0, 1))[rank * rows:(rank + 1) * rows] for t in inputs]))


def test_gloo_all_to_all_carries_encoded_rows():
    seed = _seed()
    results = run_distributed(_a2a_worker, 2, seed, 5, timeout=90)
    assert all(v for r in results for v in r), f"seed {seed}: per rank (values equal, bytes equal) {results}"


def test_options_parse():
    assert FP8Options() == FP8Options.parse("qvo") == FP8Options(qvo=True, k=False, ring_kv=False)
    assert FP8Options.parse("qvo,k") == FP8Options(qvo=True, k=True)
    assert FP8Options.parse(" QVO , k , ring_kv ") == FP8Options(qvo=True, k=True, ring_kv=True)
    assert FP8Options.parse("none") == FP8Options(qvo=False)
    assert FP8Options.parse("ring_kv") == FP8Options(qvo=False, ring_kv=True)
    for opts in (FP8Options(), FP8Options(qvo=False), FP8Options(k=True, ring_kv=True)):
        assert FP8Options.parse(str(opts)) == opts
    for bad in ("", "qvo,v", "fp8", "none,k"):
        with pytest.raises(ValueError, match="qvo, k, ring_kv"):
            FP8Options.parse(bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        FP8Options().k = True
