"""Bad configurations raise ValueError naming the fix, on every rank, before any collective."""
import pytest
import torch

from fastusp_xdit import usp_attention
from fastusp_xdit.apps.launch import run_distributed


def _qkv(b=1, h=4, s=8, d=8, hkv=None, dtype=torch.float32):
    return torch.randn(b, h, s, d, dtype=dtype), *(torch.randn(b, hkv or h, s, d, dtype=dtype) for _ in range(2))


@pytest.mark.parametrize("mutate,needle", [
    (lambda q, k, v: (q[0], k, v), "4-D"),
    (lambda q, k, v: (q, k.double(), v), "dtypes differ"),
    (lambda q, k, v: (q.int(), k, v), "dtype"),
    (lambda q, k, v: (q, k, v[..., :4]), "same shape"),
    (lambda q, k, v: (q[..., :4], k, v), "head_dim"),
    (lambda q, k, v: (q[:, :3], k, v), "multiple of key/value heads"),
])
def test_shape_and_dtype_errors(mutate, needle):
    with pytest.raises(ValueError, match=needle):
        usp_attention(*mutate(*_qkv()))


def test_joint_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="joint_strategy"):
        usp_attention(q, k, v, joint_key=k, joint_value=v)
    with pytest.raises(ValueError, match="together"):
        usp_attention(q, k, v, joint_key=k, joint_strategy="front")
    with pytest.raises(ValueError, match="replicated"):
        usp_attention(q, k, v, joint_key=k[:, :2], joint_value=v[:, :2], joint_strategy="rear")
    with pytest.raises(ValueError, match="'front', 'rear'"):
        usp_attention(q, k, v, joint_strategy="middle")


def test_wrong_global_length():
    with pytest.raises(ValueError, match="seq_len_q"):
        usp_attention(*_qkv(), seq_len_q=9)
    with pytest.raises(ValueError, match="zero keys"):
        usp_attention(*_qkv(s=0))


def test_remembered_plan_never_excuses_another_call():
    """Eager calls reuse the spec of an identical earlier call (spec._SPECS); any other argument is checked anew."""
    from fastusp_xdit.usp import spec

    q, k, v = _qkv()
    want = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    for _ in range(2):  # the second call takes the remembered plan
        torch.testing.assert_close(usp_attention(q, k, v, seq_len_q=8), want, rtol=1e-5, atol=1e-5)
    assert any(key[-1].seq_len_q == 8 for key in spec._SPECS), "the valid call's spec was not remembered"
    with pytest.raises(ValueError, match="seq_len_q"):
        usp_attention(q, k, v, seq_len_q=9)
    with pytest.raises(ValueError, match="same shape"):
        usp_attention(q, k, v[..., :4])
    with pytest.raises(ValueError, match="dtypes differ"):
        usp_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="seq_len_q must be"):
        usp_attention(q, k, v, seq_len_q=[8])  # unhashable: validated, not remembered


def _no_collective(*_args, **_kwargs):
    raise AssertionError("a collective was issued before validation")


def bad_input_worker(case: str):
    """On every rank: forbid collectives, call usp_attention with a bad configuration, report the error."""
    import fastusp_xdit.usp.steps as steps
    from fastusp_xdit.usp import usp_attention
    from fastusp_xdit.usp.groups import usp_groups

    ug, rg = usp_groups(2, 1)
    steps.all_to_all = steps.ring_shift = _no_collective
    q, k, v = _qkv(h=4, s=4)
    kwargs = dict(ulysses_group=ug, ring_group=rg)
    if case == "heads":
        q, k, v = _qkv(h=1, s=4)
    elif case == "length":  # wrong on both ranks; a rank-local mismatch needs a cross-rank check
        kwargs["seq_len_q"] = 10
    elif case == "joint":
        kwargs.update(joint_key=k, joint_value=v, joint_strategy="sideways")
    try:
        usp_attention(q, k, v, **kwargs)
    except ValueError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("case,needle", [("heads", "ulysses degree 2 exceeds"), ("length", "seq_len_q"),
                                         ("joint", "joint_strategy")])
def test_every_rank_raises_before_any_collective(case, needle):
    messages = run_distributed(bad_input_worker, 2, case, timeout=60)
    assert all(needle in m for m in messages), messages
