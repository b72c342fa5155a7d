"""INT8 row codec (fastusp_xdit.comm.int8) on CPU: format, accuracy, ties, special rows, strides, compile.

The Triton kernels are checked byte for byte against the torch implementation on CUDA (skipped without
a GPU) and in Triton's CPU interpreter (skipped without triton); ``benchmarks/int8_codec.py`` checks
more cases on a GPU.
"""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys

import pytest
import torch

from fastusp_xdit.comm.int8 import (INT8_MAX, check_finite, decode_torch, encode_torch, encoded_row_bytes,
                                    int8_decode, int8_encode)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
D = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seed() -> int:
    return random.randrange(2**31)


def _row_rel_err(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (y.double() - x).norm(dim=-1) / x.norm(dim=-1)


def _reference_bytes(x: torch.Tensor) -> torch.Tensor:
    """The documented format computed in float64 for finite rows (every fp32 step correctly rounded)."""
    x32 = x.float()
    amax = x32.abs().amax(-1, keepdim=True).double()
    a = amax.clamp_min(2.0**-100)
    inv = (127.0 / a).float().double()  # one correctly rounded fp32 division
    scaled = (x32.double() * inv).float().double().clamp(-127, 127)  # exact product, one rounding
    q = torch.round(scaled).to(torch.int8).view(torch.uint8)  # float64 round: ties to even
    scale = torch.where(amax == 0, 0.0, a / 127.0).float()
    return torch.cat([q, scale.view(torch.uint8)], dim=-1)


def _values(buf: torch.Tensor) -> list:
    return buf[..., :-4].view(torch.int8).tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_random_rows(dtype):
    seed = _seed()
    x = torch.randn(4, 8, 64, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    buf = int8_encode(x)
    y = int8_decode(buf, dtype)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    err = _row_rel_err(y, x)
    rms, worst = err.pow(2).mean().sqrt().item(), err.max().item()
    # The step is a/127 with a = the row's absmax (~2.9 sigma for 128 Gaussians); rounding errors are
    # uniform on +-step/2, so the rms row error is (a/127)/sqrt(12) / rms(x) ~ 2.9/440 = 0.66%. Measured
    # (2048 rows, 5 seeds): rms 0.646-0.650% (0.663% in bfloat16, whose own rounding adds ~0.15% in
    # quadrature), worst row 0.97-1.09%, each row within 0.82-1.25x of its own step/sqrt(12) prediction.
    assert 0.006 < rms < 0.0072 and worst < 0.014, f"seed {seed}: rms {rms:.5f}, worst row {worst:.5f}"
    xd = x.double()
    pred = xd.abs().amax(-1) / 127 / 12**0.5 / xd.pow(2).mean(-1).sqrt()
    ratio = err / pred
    assert 0.6 < ratio.min() and ratio.max() < 1.45, f"seed {seed}: err/prediction {ratio.min():.3f}..{ratio.max():.3f}"
    if dtype == torch.float32:  # every value within half a step (plus float32 rounding)
        step = xd.abs().amax(-1, keepdim=True) / 127
        assert ((y.double() - xd).abs() <= step * (0.5 + 1e-5)).all(), f"seed {seed}"


def test_outlier_channels_coarsen_the_rest_of_the_row():
    """Characterisation (why benchmarks/int8_accuracy.py studies error controls): one absmax scale per
    row means 100x channels set a step 100x too coarse for the ordinary channels."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, 64, D, generator=g)
    outliers = torch.randperm(D, generator=g)[:4]
    x[..., outliers] *= 100
    y = int8_decode(int8_encode(x), torch.float32)
    rest = torch.ones(D, dtype=torch.bool)
    rest[outliers] = False
    whole = _row_rel_err(y, x).pow(2).mean().sqrt()
    ordinary = _row_rel_err(y[..., rest], x[..., rest]).pow(2).mean().sqrt()
    # whole rows: the outliers hold the norm, error ~ sqrt(124/12) * step / |x| ~ 3%; the ordinary
    # channels alone: step ~ 2.2 against values of rms 1, error ~ 0.6 (e4m3 keeps them at ~2.6%).
    assert 0.01 < whole < 0.06 and 0.3 < ordinary < 1.0, f"seed {seed}: whole {whole:.4f} ordinary {ordinary:.4f}"


def test_bytes_match_float64_reference():
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, D, generator=g)
    x[0, 0] *= 1e-32  # below the 2**-100 amax floor
    x[0, 2] *= 1e-3
    x[1, 0, :4] = 0.0
    x[1, 0, :] *= 100
    x[1, 1, 7] = 500.0  # an outlier value
    for dtype in DTYPES:
        xd = x.to(dtype, copy=True)
        xd[0, 1] *= torch.finfo(dtype).max / 2 / xd[0, 1].abs().max()  # huge finite
        got = int8_encode(xd)
        want = _reference_bytes(xd)
        bad = (got != want).nonzero()
        assert bad.numel() == 0, f"seed {seed}, {dtype}: {len(bad)} bytes differ, first at {bad[0].tolist()}"


def test_round_half_to_even():
    # amax 127: 127/a is exactly 1, the values are quantized unscaled and these sit exactly on .5 steps.
    ties = [127.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 125.5, 126.5, -126.5, 0.49999997, 2.5000002]
    row = torch.zeros(D)
    row[: len(ties)] = torch.tensor(ties)
    assert _values(int8_encode(row))[: len(ties)] == [127, 0, 2, 2, 4, 0, -2, -2, -4, 126, 126, -126, 0, 3]
    # amax 254: 127/a is exactly 0.5, ties reached through the scaling: 1, 3, 5, -7 -> .5 steps.
    row = torch.zeros(D)
    row[:5] = torch.tensor([254.0, 1.0, 3.0, 5.0, -7.0])
    assert _values(int8_encode(row))[:5] == [127, 0, 2, 2, -4]
    # 127/(3/64) as a reciprocal product (torch's ``127 / t``) is 1 ulp above the correctly rounded
    # quotient and moves this value, whose correctly rounded product is exactly 2.5, up to 3.
    row = torch.zeros(D)
    row[:2] = torch.tensor([3 / 64, 0.0009227362461388111])
    assert _values(int8_encode(row))[:2] == [127, 2]
    for dtype in DTYPES:
        r = row.to(dtype)
        assert torch.equal(int8_encode(r), _reference_bytes(r)), dtype


def test_byte_layout():
    seed = _seed()
    x = torch.randn(5, 7, D, generator=torch.Generator().manual_seed(seed)).bfloat16()
    buf = int8_encode(x)
    assert buf.dtype == torch.uint8 and buf.shape == (5, 7, encoded_row_bytes(D)) == (5, 7, D + 4)
    assert buf.is_contiguous()
    scale = buf[..., D:].contiguous().view(torch.float32).squeeze(-1)
    amax = x.float().abs().amax(-1)
    assert torch.equal(scale, amax / torch.full_like(amax, INT8_MAX)), f"seed {seed}"
    assert bytes(buf[0, 0, D:].tolist()) == struct.pack("<f", scale[0, 0].item()), "little-endian float32"
    values = buf[..., :D].view(torch.int8)
    assert values.abs().amax(-1).eq(127).all(), f"seed {seed}: each row's absmax maps to +-127"
    assert values.min() >= -127, "-128 is never used"
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
    buf = int8_encode(x)
    zero = x.abs().amax(-1) == 0
    assert (buf[zero] == 0).all(), "zero rows encode to zero bytes (values and scale)"
    y = int8_decode(buf, dtype)
    assert not y.isnan().any() and (y[zero] == 0).all(), f"seed {seed}"
    assert torch.equal(y[~zero], int8_decode(int8_encode(x[~zero]), dtype)), "rows are independent"


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_rows_decode_to_nan(dtype):
    seed = _seed()
    x = torch.randn(4, 5, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x[0, 0, 3] = float("inf")
    x[1, 2, 0] = -float("inf")
    x[3, 4, 100] = float("nan")
    x[2, 1] = float("inf")  # a whole row
    bad = ~torch.isfinite(x).all(-1)
    buf = int8_encode(x)
    assert (buf[..., :D][bad] == 0).all(), "non-finite rows carry values 0"
    assert (buf[..., D:][bad].contiguous().view(torch.int32) == 0x7FC00000).all(), "and a NaN scale"
    y = int8_decode(buf, dtype)
    assert y[bad].isnan().all() and not y[~bad].isnan().any(), f"seed {seed}"
    assert torch.equal(y[~bad], int8_decode(int8_encode(x[~bad]), dtype)), "finite rows are unaffected"
    with pytest.raises(ValueError, match="non-finite values"):
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
        buf = int8_encode(v)
        assert buf.is_contiguous() and torch.equal(buf, int8_encode(v.contiguous())), f"{name}, seed {seed}"
        want = int8_decode(buf, dtype)
        if buf.dim() >= 2:
            flipped = buf.transpose(0, -2)  # decode reads strided bytes and writes contiguous values
            got = int8_decode(flipped, dtype)
            assert got.is_contiguous() and torch.equal(got, want.transpose(0, -2)), f"{name}, seed {seed}"


def test_encode_into_a_packed_buffer_slot():
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 8, 3, D, generator=g).bfloat16()  # (B, S, H, D)
    b = torch.randn(5, 2, 64, generator=g).half()
    size_a, size_b = a[0].numel() // D * (D + 4), b.numel() // 64 * 68
    buf = torch.full((7 + size_a + size_b + 5,), 0xAB, dtype=torch.uint8)  # poisoned
    slot_a = buf[7:7 + size_a].view(8, 3, D + 4)  # odd byte offset: no alignment assumed
    slot_b = buf[7 + size_a:7 + size_a + size_b].view(5, 2, 68)
    assert int8_encode(a[1].transpose(0, 1).contiguous().transpose(0, 1), out=slot_a) is slot_a
    int8_encode(b, out=slot_b)
    assert torch.equal(slot_a, int8_encode(a[1])) and torch.equal(slot_b, int8_encode(b)), f"seed {seed}"
    assert (buf[:7] == 0xAB).all() and (buf[-5:] == 0xAB).all(), "bytes outside the slots stay untouched"
    with pytest.raises(ValueError, match="int8_encode out= must be a contiguous uint8 tensor of shape \\(8, 3, 132\\)"):
        int8_encode(a[1], out=torch.empty(3, 8, D + 4, dtype=torch.uint8).transpose(0, 1))
    with pytest.raises(ValueError, match="contiguous uint8"):
        int8_encode(a[1], out=torch.empty(8, 3, D, dtype=torch.uint8))
    torch.library.opcheck(torch.ops.fastusp.int8_encode_into.default,
                          (a[1].transpose(0, 1), slot_a.transpose(0, 1).contiguous()))


def test_invalid_inputs_raise_value_error():
    x = torch.randn(3, 4, D)
    with pytest.raises(ValueError, match="int8_encode takes float16/bfloat16/float32"):
        int8_encode(x.double())
    with pytest.raises(ValueError, match="last-dim stride 1.*contiguous"):
        int8_encode(x.transpose(-1, -2))
    with pytest.raises(ValueError, match="1 to 5 dims.*flatten"):
        int8_encode(torch.randn(1, 1, 1, 1, 1, 8))
    buf = int8_encode(x)
    with pytest.raises(ValueError, match="int8_decode takes the uint8 buffer int8_encode made"):
        int8_decode(buf.view(torch.int8), torch.float32)
    with pytest.raises(ValueError, match="D \\+ 4 bytes"):
        int8_decode(buf[..., :4], torch.float32)
    with pytest.raises(ValueError, match="produces float16/bfloat16/float32"):
        int8_decode(buf, torch.float64)


def test_custom_ops_fake_impls_and_schemas():
    seed = _seed()
    x = torch.randn(2, 3, 8, 64, generator=torch.Generator().manual_seed(seed)).bfloat16()
    buf = int8_encode(x)
    torch.library.opcheck(torch.ops.fastusp.int8_encode.default, (x.permute(2, 0, 1, 3),))
    torch.library.opcheck(torch.ops.fastusp.int8_decode.default, (buf.permute(1, 0, 2, 3), torch.float16))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fx = torch.empty(5, 1, 24, 72, dtype=torch.float16)
        fb = int8_encode(fx)
        assert fb.shape == (5, 1, 24, 76) and fb.dtype == torch.uint8
        fy = int8_decode(fb, torch.bfloat16)
        assert fy.shape == (5, 1, 24, 72) and fy.dtype == torch.bfloat16
        slot = torch.empty(24, 5, 76, dtype=torch.uint8)
        assert int8_encode(fx.view(5, 24, 72).transpose(0, 1), out=slot) is slot


def test_compile_fullgraph_matches_eager():
    seed = _seed()
    x = torch.randn(2, 4, 16, 64, generator=torch.Generator().manual_seed(seed)).bfloat16()

    def roundtrip(t):  # the Ulysses pattern: permuted view in, contiguous values out
        buf = int8_encode((t * 2).permute(2, 0, 1, 3))
        return int8_decode(buf, torch.bfloat16).permute(1, 2, 0, 3) + 1

    torch._dynamo.reset()
    explained = torch._dynamo.explain(roundtrip)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(roundtrip, fullgraph=True)(x)
    assert torch.equal(got, roundtrip(x)), f"seed {seed}"


def test_compile_fullgraph_encode_into_slots_matches_eager():
    seed = _seed()
    x = torch.randn(2, 4, 16, 64, generator=torch.Generator().manual_seed(seed)).bfloat16()

    def pack(t):  # two head groups, each permuted to token-major, packed back to back in one buffer
        buf = torch.empty(2 * 16 * 2 * 2 * 68, dtype=torch.uint8)
        half = buf.numel() // 2
        for j in range(2):
            int8_encode(t[:, 2 * j:2 * j + 2].permute(2, 0, 1, 3), out=buf[j * half:(j + 1) * half].view(16, 2, 2, 68))
        return buf

    torch._dynamo.reset()
    got = torch.compile(pack, fullgraph=True)(x)
    assert torch.equal(got, pack(x)), f"seed {seed}"


def _special_rows(dtype: torch.dtype) -> torch.Tensor:
    """(2, 6, 24, 72) of ``dtype``: random rows and every special kind (zeros, tiny, huge, ties, inf/nan)."""
    x = torch.randn(2, 6, 24, 72, generator=torch.Generator().manual_seed(0))
    x[1, ..., [3, 17, 40]] *= 100
    x[0, 0, 0] = 0.0
    x[0, 0, 1] = -0.0
    x[0, 2, 3] *= 1e-35 if dtype != torch.float16 else 1e-6
    x[0, 4, 6] = 0.0
    x[0, 4, 6, :10] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -3.5, 125.5, -126.5, 0.25, 0.75])
    x[0, 4, 7] = 0.0
    x[0, 4, 7, :2] = torch.tensor([3 / 64, 0.0009227362461388111])
    x[0, 5, 8, 3] = float("inf")
    x[0, 5, 9, 0] = -float("inf")
    x[0, 5, 10, 7] = float("nan")
    x = x.to(dtype)
    x[0, 3, 5] *= torch.finfo(dtype).max / 2 / x[0, 3, 5].abs().max()
    return x


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and bits; floats: NaN matches any NaN (the GPU's NaN product has its own payload)."""
    a, b = a.cpu().contiguous(), b.cpu().contiguous()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan = a.isnan()
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_bytes_equal_torch_bytes():
    from fastusp_xdit.comm import int8

    if not int8.triton_serves(torch.cuda.current_device()):
        pytest.skip("the Triton INT8 path is not active (needs triton and sm >= 8.0)")
    for dtype in DTYPES:
        x = _special_rows(dtype)
        for v in (x, x.permute(2, 0, 1, 3), x[:, ::2], x.view(2, 2, 3, 24, 72).permute(1, 3, 0, 2, 4)):
            want = encode_torch(v)
            assert _bitwise_equal(int8_encode(v.cuda()), want), dtype
            slot = torch.zeros(3 + want.numel(), dtype=torch.uint8, device="cuda")[3:].view(want.shape)
            int8_encode(v.cuda(), out=slot)
            assert _bitwise_equal(slot, want), dtype
            assert _bitwise_equal(int8_decode(want.cuda(), dtype), decode_torch(want, dtype)), dtype
            flipped = want.transpose(0, -2)
            assert _bitwise_equal(int8_decode(flipped.cuda(), dtype), decode_torch(flipped, dtype)), dtype


_INTERPRETED = """
import sys, torch
from fastusp_xdit.comm import int8_triton
from fastusp_xdit.comm.int8 import decode_torch, encode_torch
sys.path.insert(0, {tests!r})
from test_int8_codec import DTYPES, _bitwise_equal, _special_rows
for dtype in DTYPES:
    x = _special_rows(dtype)
    for v in (x, x.permute(2, 0, 1, 3), x[:, ::2], x.view(2, 2, 3, 24, 72).permute(1, 3, 0, 2, 4)):
        want = encode_torch(v)
        assert _bitwise_equal(int8_triton.encode(v), want), ("encode", dtype, v.shape)
        slot = torch.zeros(3 + want.numel(), dtype=torch.uint8)[3:].view(want.shape)
        assert _bitwise_equal(int8_triton.encode(v, slot), want), ("encode into", dtype)
        if dtype != torch.bfloat16:  # the interpreter's own bfloat16 rounding is not RNE
            for b in (want, want.transpose(0, -2)):
                assert _bitwise_equal(int8_triton.decode(b, dtype), decode_torch(b, dtype)), ("decode", dtype)
print("interpreted kernels equal")
"""


def test_triton_interpreter_bytes_equal_torch_bytes():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    code = _INTERPRETED.format(tests=os.path.join(ROOT, "tests"))
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0 and "interpreted kernels equal" in proc.stdout, proc.stdout + proc.stderr
