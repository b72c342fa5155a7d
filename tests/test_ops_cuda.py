"""CUDA checks of the local attention op (run on a lent GPU: skipped where CUDA is absent)."""
import pytest
import torch

from fastusp_xdit import usp_attention
from fastusp_xdit.ops import attention_with_lse, merge_partials, select_backend
from fastusp_xdit.usp.verify import reference_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 2e-3, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}  # efficient fp32 uses TF32-free math


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def _inputs(b, h, hkv, sq, skv, d, dtype, token_major, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(heads, s):
        if token_major:  # the layout usp_attention hands to the kernel
            return torch.randn(s, b, heads, d, device="cuda", generator=g).to(dtype).permute(1, 2, 0, 3)
        return torch.randn(b, heads, s, d, device="cuda", generator=g).to(dtype)

    return rnd(h, sq), rnd(hkv, skv), rnd(hkv, skv)


@pytest.mark.parametrize("backend,dtype", [("cudnn", torch.bfloat16), ("cudnn", torch.float16), ("flash", torch.bfloat16),
                                           ("efficient", torch.bfloat16), ("efficient", torch.float32)])
@pytest.mark.parametrize("shape", [(1, 24, 24, 4608 // 2, 4608, 128), (2, 6, 3, 333, 517, 64), (1, 4, 4, 1, 77, 128)])
@pytest.mark.parametrize("token_major", [False, True])
def test_backend_matches_float64(backend, dtype, shape, token_major, seed):
    b, h, hkv, sq, skv, d = shape
    q, k, v = _inputs(b, h, hkv, sq, skv, d, dtype, token_major, seed)
    out, lse = attention_with_lse(q, k, v, backend=backend)
    assert out.permute(2, 0, 1, 3).is_contiguous() and lse.shape == (b, h, sq) and lse.dtype == torch.float32
    ref = reference_attention(q, k, v)
    assert _rel(out, ref) <= TOL[dtype], f"seed={seed}"
    rep = h // hkv
    ref_lse = torch.logsumexp(q.double() @ k.double().repeat_interleave(rep, 1).transpose(-1, -2) * d ** -0.5, -1)
    assert (lse.double() - ref_lse).abs().max().item() <= 2e-2, f"seed={seed}"


def test_default_backend_on_hopper_is_cudnn():
    q = torch.randn(1, 24, 128, 128, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert select_backend(q) == "cudnn"


def test_merge_on_cuda_equals_full(seed):
    q, k, v = _inputs(1, 8, 8, 512, 2048, 128, torch.bfloat16, True, seed)
    parts = [attention_with_lse(q, kb, vb) for kb, vb in zip(k.split(512, 2), v.split(512, 2))]
    out, _ = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert _rel(out, reference_attention(q, k, v)) <= 1e-2, f"seed={seed}"


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_usp_world1_compiles_and_replays_cuda_graphs(mode, seed):
    q, k, v = _inputs(1, 24, 24, 1024, 1024, 128, torch.bfloat16, False, seed)
    jq, jk, jv = _inputs(1, 24, 24, 64, 64, 128, torch.bfloat16, False, seed + 1)
    kwargs = dict(joint_query=jq, joint_key=jk, joint_value=jv, joint_strategy="front")
    eager = usp_attention(q, k, v, **kwargs)
    compiled = torch.compile(usp_attention, fullgraph=True, mode=mode)
    for _ in range(3):  # warm-up, record, replay
        out = compiled(q, k, v, **kwargs).clone()
    torch.testing.assert_close(out, eager, atol=2e-2, rtol=2e-2)
