"""The LSE-merge op (``fastusp::lse_merge``): torch implementation against float64 formulas, fake
shapes/strides, compile, and the Triton kernel (interpreter on CPU when triton is importable; CUDA)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fastusp_xdit.ops import attention_with_lse
from fastusp_xdit.ops.merge import lse_merge, merge_partials, merge_torch
from fastusp_xdit.usp.verify import reference_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(s, b, h, d, dtype_a, dtype_b, seed, device="cpu", spread=5.0):
    """Token-major (B, H, S, D) views (the ring's layout) and (B, H, S) LSEs, fresh from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(s, b, h, d, generator=g).to(dtype_a).permute(1, 2, 0, 3)
    b_ = torch.randn(s, b, h, d, generator=g).to(dtype_b).permute(1, 2, 0, 3)
    la, lb = (torch.randn(b, h, s, generator=g) * spread for _ in range(2))
    return [t.to(device) for t in (a, la, b_, lb)]


def _reference(a, la, b, lb):
    """float64 softmax-weighted union: out = (e^la a + e^lb b) / (e^la + e^lb), lse = logaddexp."""
    la, lb = la.double(), lb.double()
    m = torch.maximum(la, lb)
    wa, wb = torch.exp(la - m).unsqueeze(-1), torch.exp(lb - m).unsqueeze(-1)
    return (wa * a.double() + wb * b.double()) / (wa + wb), torch.logaddexp(la, lb)


def _rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, torch.float32),
                                    (torch.bfloat16, torch.bfloat16, torch.float32),
                                    (torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32, torch.float16)])
def test_merge_matches_float64_formula(dtypes, seed):
    dtype_a, dtype_b, dtype = dtypes
    a, la, b, lb = _inputs(9, 2, 3, 16, dtype_a, dtype_b, seed)
    out, lse = lse_merge(a, la, b, lb, dtype)
    ref_out, ref_lse = _reference(a, la, b, lb)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert _rel(out, ref_out) <= TOL[dtype], f"seed={seed}"
    assert (lse.double() - ref_lse).abs().max().item() <= 1e-5, f"seed={seed}"


def test_merge_keeps_memory_orders(seed):
    a, la, b, lb = _inputs(5, 2, 3, 8, torch.bfloat16, torch.bfloat16, seed)
    la_sbh = la.permute(2, 0, 1)  # the (S, B, H) view of a (B, H, S) LSE, as usp._ring holds it
    out, lse = lse_merge(a.permute(2, 0, 1, 3), la_sbh, b.permute(2, 0, 1, 3), lb.permute(2, 0, 1))
    assert out.dtype == torch.float32 and out.is_contiguous(), "token-major in, token-major out"
    assert lse.stride() == la_sbh.stride(), "LSE keeps the memory order of a_lse"


def test_merge_far_apart_lse_and_default_dtype():
    a, b = torch.ones(1, 2, 4, dtype=torch.bfloat16), torch.full((1, 2, 4), 3.0, dtype=torch.bfloat16)
    la, lb = torch.tensor([[1000.0, -1000.0]]), torch.tensor([[-1000.0, 1000.0]])
    out, lse = lse_merge(a, la, b, lb)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(lse, torch.tensor([[1000.0, 1000.0]]))


def test_merge_rejects_mismatched_shapes():
    a = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="one shape"):
        lse_merge(a, torch.zeros(2, 3), torch.zeros(2, 3, 5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="without its last dim"):
        lse_merge(a, torch.zeros(3, 2), a, torch.zeros(3, 2))


def test_op_fake_matches_real(seed):
    a, la, b, lb = _inputs(6, 1, 2, 8, torch.float32, torch.bfloat16, seed)
    torch.library.opcheck(torch.ops.fastusp.lse_merge.default, (a, la, b, lb, torch.bfloat16))
    torch.library.opcheck(torch.ops.fastusp.lse_merge.default,
                          (a.permute(2, 0, 1, 3), la.permute(2, 0, 1), b.permute(2, 0, 1, 3), lb.permute(2, 0, 1),
                           torch.float32))


def _ring_merge(outs, lses, acc_dtype, out_dtype):
    """How usp._ring merges: block 0 as is, fp32 running merges, the last one in the output dtype."""
    acc, lse = outs[0], lses[0]
    for i in range(1, len(outs)):
        acc, lse = lse_merge(acc, lse, outs[i], lses[i], out_dtype if i == len(outs) - 1 else acc_dtype)
    return acc


def test_ring_merge_compiles_fullgraph_and_equals_attention(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    parts = [attention_with_lse(q, kb, vb) for kb, vb in zip(k.split([5, 4, 3], 2), v.split([5, 4, 3], 2))]
    outs, lses = [p[0] for p in parts], [p[1] for p in parts]
    eager = _ring_merge(outs, lses, torch.float32, torch.bfloat16)
    compiled = torch.compile(_ring_merge, fullgraph=True, backend="aot_eager")(outs, lses, torch.float32,
                                                                               torch.bfloat16)
    assert eager.dtype == torch.bfloat16 and eager.permute(2, 0, 1, 3).is_contiguous()
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    assert _rel(eager, reference_attention(q, k, v)) <= TOL[torch.bfloat16], f"seed={seed}"
    fp32 = merge_partials(outs, lses)[0]
    assert fp32.dtype == torch.float32 and _rel(fp32, reference_attention(q, k, v)) <= TOL[torch.bfloat16]


_INTERPRETED = """
import sys, torch
from fastusp_xdit.ops import merge_triton
from fastusp_xdit.ops.merge import merge_torch
seed = int(sys.argv[1])
bf16, f32, f16 = torch.bfloat16, torch.float32, torch.float16
g = torch.Generator().manual_seed(seed)
cases = [((37, 2, 3, 24), (f32, bf16, f32), 8), ((37, 2, 3, 24), (bf16, bf16, bf16), None),
         ((16, 1, 4, 32), (f32, f32, f32), 3), ((5, 1, 1, 8), (f16, f32, bf16), None)]
for (s, b, h, d), (da, db, dt), rows in cases:
    a = torch.randn(s, b, h, d, generator=g).to(da).permute(1, 2, 0, 3)
    bb = torch.randn(s, b, h, d, generator=g).to(db).permute(1, 2, 0, 3)
    la, lb = (torch.randn(b, h, s, generator=g) * 5 for _ in range(2))
    la[..., 0], lb[..., 0] = 1000.0, -1000.0  # far apart: no overflow
    for args in ((a, la, bb, lb), (a.permute(2, 0, 1, 3), la.permute(2, 0, 1), bb.permute(2, 0, 1, 3),
                                   lb.permute(2, 0, 1)), (a[:, 1:], la[:, 1:], bb[:, 1:], lb[:, 1:]),
                 (a, la, bb.contiguous(), lb.permute(2, 0, 1).contiguous().permute(1, 2, 0))):  # b, lb strides != a's
        out, lse = merge_triton.merge(*args, dt, block_rows=rows)
        ref, ref_lse = merge_torch(*args, dt)
        assert out.stride() == ref.stride() and lse.stride() == ref_lse.stride(), (out.stride(), ref.stride())
        # one output ulp: the interpreter's float casts do not round to nearest even
        rtol = {f32: 1e-6, bf16: 2 ** -7, f16: 2 ** -10}[dt]
        torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=1e-6, msg=f"seed={seed} {s, b, h, d}")
        torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-5, msg=f"seed={seed}")
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
def test_triton_kernel_in_interpreter_matches_torch(seed):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED, str(seed)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


@cuda
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16, torch.float32),
                                    (torch.float32, torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16, torch.bfloat16)])
def test_cuda_kernel_matches_torch(dtypes, seed):
    from fastusp_xdit.ops import merge as M

    dtype_a, dtype_b, dtype = dtypes
    a, la, b, lb = _inputs(1024 + 7, 1, 24, 128, dtype_a, dtype_b, seed, "cuda")
    assert M._kernel_takes(a, la, b, lb, dtype), "the Triton kernel must serve this case"
    for args in ((a, la, b, lb), (a.permute(2, 0, 1, 3), la.permute(2, 0, 1), b.permute(2, 0, 1, 3),
                                  lb.permute(2, 0, 1)),
                 (a[:, 1:], la[:, 1:], b.contiguous()[:, 1:],
                  lb.permute(2, 0, 1).contiguous().permute(1, 2, 0)[:, 1:])):
        out, lse = lse_merge(*args, dtype)
        ref, ref_lse = merge_torch(*args, dtype)
        assert out.stride() == ref.stride() and lse.stride() == ref_lse.stride()
        tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}[dtype]  # fast exp/div; bf16: one ulp
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=1e-5, msg=f"seed={seed}")
        torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-5, msg=f"seed={seed}")


@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_ring_merge_compiles_and_replays(mode, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 8, 1024, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    parts = [attention_with_lse(q, kb, vb) for kb, vb in zip(k.chunk(4, 2), v.chunk(4, 2))]
    outs, lses = [p[0] for p in parts], [p[1] for p in parts]
    eager = _ring_merge(outs, lses, torch.float32, torch.bfloat16)
    compiled = torch.compile(_ring_merge, fullgraph=True, mode=mode)
    for _ in range(3):  # warm-up, record, replay
        out = compiled(outs, lses, torch.float32, torch.bfloat16).clone()
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    assert _rel(eager, reference_attention(q, k, v)) <= TOL[torch.bfloat16], f"seed={seed}"
