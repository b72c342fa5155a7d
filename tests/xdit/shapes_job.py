"""Worker job of the shape tests and benchmarks/shapes.py: xfuser wrappers vs the plain diffusers model."""
from __future__ import annotations

import torch


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def shapes_job(cases, ulysses: int, ring: int, backends=("fastusp",), control: bool = False) -> dict:
    """For each ``(family, shape)``: max rel. error of xfuser's wrapper under each backend vs one process.

    Every rank builds the same tiny model and inputs from seed 0 and runs the plain diffusers model
    itself (the 1-process reference). An error is reported as ``"ExcType: message"``. ``control``:
    one more fastusp run of the first case with half of every rank's keys dropped (must fail the bound).
    """
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from xdit_helpers import xfuser_runtime

    from fastusp_xdit.xdit.tiny_models import family, sample

    state = xfuser_runtime(ulysses, ring, backend=backends[0])
    out = {}
    with torch.no_grad():
        for name, shape in cases:
            fam = family(name)
            model = fam.build(0)
            inputs = fam.inputs(shape)
            # read by xfuser's FLUX.1 single-stream processor (set by its runner from the prompt length)
            state.max_condition_sequence_length = inputs["encoder_hidden_states"].shape[1]
            ref = sample(model(**inputs))
            wrapped = fam.wrap(model)
            res = {}
            for backend in backends:
                state.set_attention_backend(backend)
                try:
                    res[backend] = _rel(sample(wrapped(**fam.inputs(shape))), ref)
                except Exception as e:  # noqa: BLE001 -- reported, compared by the caller
                    res[backend] = f"{type(e).__name__}: {str(e)[:300]}"
            out[(name, shape)] = res
        if control:
            import fastusp_xdit.xdit.usp_adapter as adapter

            real = adapter.usp_attention

            def half_keys(q, k, v, **kw):
                kw.pop("seq_len_kv", None), kw.pop("shards_kv", None)
                return real(q, k[:, :, : k.shape[2] // 2], v[:, :, : v.shape[2] // 2], **kw)

            adapter.usp_attention = half_keys
            name, shape = cases[0]
            fam = family(name)
            model = fam.build(0)
            ref = sample(model(**fam.inputs(shape)))
            state.set_attention_backend("fastusp")
            try:
                out["control"] = _rel(sample(fam.wrap(model)(**fam.inputs(shape))), ref)
            finally:
                adapter.usp_attention = real
    return out


def compile_shapes_job(cases, ulysses: int, ring: int, compiler: str = "aot_eager") -> dict:
    """For each ``(family, shape)``: ``torch._dynamo.explain`` over xfuser's wrapper (patched forward,
    fastusp) -- graphs, graph breaks and their reasons -- and ``torch.compile(fullgraph=True)``'s
    output vs eager and vs the 1-process model."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from torch import _dynamo
    from xdit_helpers import xfuser_runtime

    from fastusp_xdit.xdit.tiny_models import family, sample

    state = xfuser_runtime(ulysses, ring, backend="fastusp")
    out = {}
    with torch.no_grad():
        for name, shape in cases:
            fam = family(name)
            model = fam.build(0)
            inputs = fam.inputs(shape)
            state.max_condition_sequence_length = inputs["encoder_hidden_states"].shape[1]
            ref = sample(model(**inputs))
            wrapped = fam.wrap(model)
            eager = sample(wrapped(**fam.inputs(shape)))
            _dynamo.reset()
            explain = _dynamo.explain(wrapped.forward)(**fam.inputs(shape))
            _dynamo.reset()
            compiled = sample(torch.compile(wrapped.forward, fullgraph=True, backend=compiler)(**fam.inputs(shape)))
            out[(name, shape)] = {"graphs": explain.graph_count, "breaks": explain.graph_break_count,
                                  "reasons": [str(b.reason)[:300] for b in explain.break_reasons],
                                  "vs_eager": _rel(compiled, eager), "vs_one_process": _rel(compiled, ref)}
    return out
