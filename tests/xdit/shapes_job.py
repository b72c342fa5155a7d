"""Worker job of the shape tests and benchmarks/shapes.py: xfuser wrappers vs the plain diffusers model."""
from __future__ import annotations

import torch

from fastusp_xdit.xdit.tiny_models import sample


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def shapes_job(cases, ulysses: int, ring: int, backends=("fastusp",), control: bool = False, trace=(),
               compiler: str | None = None) -> dict:
    """For each ``(family, shape)``: max rel. error of xfuser's wrapper under each backend vs one process.

    Every rank builds the same tiny model and inputs from seed 0 and runs the plain diffusers model
    itself (the 1-process reference). An error is reported as ``"ExcType: message"``. ``control``:
    one more fastusp run of the first case with every rank's values reversed along the sequence,
    so keys meet the wrong values (must fail the bound).
    ``trace``: cases also traced under fastusp (:func:`_trace`, with ``compiler``), in ``out["trace"]``.
    """
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from xdit_helpers import xfuser_runtime

    from fastusp_xdit.xdit.tiny_models import family, sample

    state = xfuser_runtime(ulysses, ring, backend=backends[0])
    trace = {tuple(c) for c in trace}
    out = {}
    with torch.no_grad():
        for name, shape in cases:
            fam = family(name)
            model = fam.build(0)
            inputs = fam.inputs(shape)
            # read by xfuser's FLUX.1 single-stream processor (set by its runner from the prompt length)
            if "encoder_hidden_states" in inputs:
                state.max_condition_sequence_length = inputs["encoder_hidden_states"].shape[1]
            ref = sample(model(**inputs))
            res = {}
            for backend in backends:
                state.set_attention_backend(backend)
                try:
                    wrapped = fam.wrap(model)  # some wrappers read the backend or degrees when built
                    res[backend] = _rel(sample(fam.run(wrapped, fam.inputs(shape))), ref)
                except Exception as e:  # noqa: BLE001 -- reported, compared by the caller
                    res[backend] = f"{type(e).__name__}: {str(e)[:300]}"
            out[(name, shape)] = res
            if (name, shape) in trace:
                state.set_attention_backend("fastusp")
                eager = sample(fam.run(wrapped, fam.inputs(shape)))
                out.setdefault("trace", {})[(name, shape)] = _trace(wrapped, lambda: fam.inputs(shape), eager, ref,
                                                                    compiler)
        if control:
            import fastusp_xdit.xdit.usp_adapter as adapter

            real = adapter.usp_attention

            def swapped_values(q, k, v, **kw):  # every key paired with another row's value
                return real(q, k, v.flip(2), **kw)

            adapter.usp_attention = swapped_values
            name, shape = cases[0]
            fam = family(name)
            model = fam.build(0)
            ref = sample(model(**fam.inputs(shape)))
            state.set_attention_backend("fastusp")
            try:
                out["control"] = _rel(sample(fam.run(fam.wrap(model), fam.inputs(shape))), ref)
            finally:
                adapter.usp_attention = real
    return out



def _trace(wrapped, inputs_fn, eager, ref, compiler) -> dict:
    """``torch._dynamo.explain`` over ``wrapped.forward`` (graphs, breaks, reasons) and, with ``compiler``,
    ``torch.compile(fullgraph=True)``'s output vs eager and vs the 1-process model."""
    from torch import _dynamo

    _dynamo.reset()
    explain = _dynamo.explain(wrapped.forward)(**inputs_fn())
    _dynamo.reset()
    res = {"graphs": explain.graph_count, "breaks": explain.graph_break_count,
           "reasons": [str(b.reason).splitlines()[0][:200] for b in explain.break_reasons]}
    if compiler:
        try:
            compiled = sample(torch.compile(wrapped.forward, fullgraph=True, backend=compiler)(**inputs_fn()))
            res.update(vs_eager=_rel(compiled, eager), vs_one_process=_rel(compiled, ref))
        except Exception as e:  # noqa: BLE001 -- reported, compared by the caller
            res["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        _dynamo.reset()
    return res


def compile_shapes_job(cases, ulysses: int, ring: int, compiler: str | None = "aot_eager") -> dict:
    """For each ``(family, shape)`` under fastusp: :func:`_trace` over xfuser's (patched) wrapper forward."""
    return shapes_job(cases, ulysses, ring, ("fastusp",), False, trace=cases, compiler=compiler)["trace"]
