"""Local attention with LSE and the LSE merge against float64 references."""
import pytest
import torch

from fastusp_xdit.ops import attention_with_lse, merge_partials
from fastusp_xdit.usp.verify import reference_attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _ref_lse(q, k, scale):
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, 1)
    return torch.logsumexp(q.double() @ k.transpose(-1, -2) * scale, dim=-1)


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 3, 7, 11, 3), (2, 4, 16, 5, 2), (1, 2, 1, 9, 1)])
def test_attention_with_lse_matches_float64(dtype, shape, seed):
    b, h, sq, skv, hkv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, 16, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, skv, 16, generator=g).to(dtype) for _ in range(2))
    out, lse = attention_with_lse(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, h, sq) and lse.dtype == torch.float32
    assert out.permute(2, 0, 1, 3).is_contiguous(), "output must be token-major"
    assert _rel(out, reference_attention(q, k, v)) <= TOL[dtype], f"seed={seed}"
    assert (lse.double() - _ref_lse(q, k, 16 ** -0.5)).abs().max().item() <= 1e-4, f"seed={seed}"


def test_attention_accepts_strided_inputs_and_scale(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 9, 4, 8, generator=g).transpose(1, 2)  # BSHD memory
    k = torch.randn(2, 12, 4, 8, generator=g).transpose(1, 2)
    v = torch.randn(2, 12, 4, 8, generator=g).transpose(1, 2)
    out, _ = attention_with_lse(q, k, v, scale=0.3)
    assert _rel(out, reference_attention(q, k, v, scale=0.3)) <= 1e-5, f"seed={seed}"


def test_fake_matches_real_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    real_out, real_lse = attention_with_lse(q, k, v)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake_out, fake_lse = attention_with_lse(fq, fk, fv)
    assert (fake_out.shape, fake_out.stride()) == (real_out.shape, real_out.stride())
    assert (fake_lse.shape, fake_lse.stride(), fake_lse.dtype) == (real_lse.shape, real_lse.stride(), real_lse.dtype)


def test_attention_compiles_fullgraph(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    compiled = torch.compile(attention_with_lse, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v)
    ref_out, ref_lse = attention_with_lse(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_of_key_blocks_equals_full_attention(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, 5, 8, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 23, 8, generator=g).to(dtype) for _ in range(2))
    parts = [attention_with_lse(q, kb, vb) for kb, vb in zip(k.split([9, 1, 13], 2), v.split([9, 1, 13], 2))]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert out.dtype == torch.float32, "merge must accumulate in fp32"
    assert _rel(out, reference_attention(q, k, v)) <= TOL[dtype], f"seed={seed}"
    assert (lse.double() - _ref_lse(q, k, 8 ** -0.5)).abs().max().item() <= 1e-4


def test_merge_handles_far_apart_lse_without_overflow():
    o1, o2 = torch.ones(1, 1, 2, 4), torch.full((1, 1, 2, 4), 3.0)
    l1, l2 = torch.tensor([[[1000.0, -1000.0]]]), torch.tensor([[[-1000.0, 1000.0]]])
    out, lse = merge_partials([o1, o2], [l1, l2])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([1.0, 3.0]))
