"""xfuser symbols we patch, backend-name parsing sites, and activate() after xfuser was imported.

Runs in a spawned process (importing xfuser patches that process for good).
"""
from __future__ import annotations

import types

from fastusp_xdit.apps.launch import run_distributed


def targets_job() -> dict:
    import torch

    from fastusp_xdit.xdit import activate, backend, compat, targets, usp_adapter

    out = {"cpu_only": compat.cpu_only()}
    # Import xfuser with only the CPU patches: every model file binds xfuser's own USP.
    compat.install()
    import xfuser  # noqa: F401
    import xfuser.model_executor.layers.usp as usp
    import xfuser.model_executor.models.transformers.transformer_flux as flux
    from xfuser.core.distributed.attention_backend import AttentionBackendType as A

    stock = usp.USP

    class Holder(torch.nn.Module):  # like transformer_wan, which stores USP on the instance
        def __init__(self):
            super().__init__()
            self.attention_function = usp.USP

    holder = Holder()
    out["members_before"] = sorted(m.name for m in A if m.name.startswith("FASTUSP"))
    activate()
    activate()
    adapter = usp_adapter.USP
    out["rebound"] = [usp.USP is adapter, flux.USP is adapter, holder.attention_function is adapter]
    out["stock_kept"] = usp_adapter.stock_usp() is stock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    from fastusp_xdit.xdit import flux_overlap

    out["flux_patched"] = [flux.xFuserFluxAttnProcessor.__call__ is flux_overlap.processor_call,
                           FluxSingleTransformerBlock.forward is flux_overlap.single_block_forward]
    out["members_after"] = [m.name for m in A if m.name.startswith("FASTUSP")]
    out["usp_kwargs"] = {m.name: variant.usp_kwargs for m, variant in backend.MEMBERS.items()}

    # every site that turns the flag into an enum member
    from xfuser.config import FlexibleArgumentParser, xFuserArgs
    from xfuser.core.distributed.attention_schedule import AttentionSchedule
    from xfuser.model_executor.models.runner_models.base_model import _parse_attention_backend

    args = xFuserArgs.add_cli_args(FlexibleArgumentParser()).parse_args(
        ["--model", "m", "--attention-backend", "fastusp_fp8"])
    out["parsed"] = [
        A[xFuserArgs.from_cli_args(args).attention_backend.upper()].name,
        _parse_attention_backend("fastusp", "attention backend").name,
        [b.name for b in AttentionSchedule.from_comma_delimited_string("fastusp, sdpa_flash ,FastUSP_FP8").backends],
    ]

    targets.check_xfuser()
    changed = types.ModuleType("xfuser.model_executor.layers.usp")
    changed.USP = lambda query, key, value, attention_kwargs=None: None
    try:
        targets.check_module(changed)
        out["changed_error"] = None
    except RuntimeError as e:
        out["changed_error"] = str(e)
    return out


def test_targets_parsing_and_late_activate():
    (res,) = run_distributed(targets_job, 1, timeout=120)
    assert res["cpu_only"]
    assert res["members_before"] == []
    assert res["rebound"] == [True, True, True], "module globals / instance attributes still hold xfuser's USP"
    assert res["stock_kept"]
    assert res["flux_patched"] == [True, True], "FLUX module loaded before activate(): overlap patches must land at once"
    assert res["members_after"] == ["FASTUSP", "FASTUSP_FP8", "FASTUSP_INT8", "FASTUSP_PIPELINED", "FASTUSP_OVERLAP"], \
        "activate() must be idempotent"
    assert res["usp_kwargs"] == {"FASTUSP": {}, "FASTUSP_FP8": {"wire": "qvo"}, "FASTUSP_INT8": {"wire": "qvo=int8,k=int8"},
                                 "FASTUSP_PIPELINED": {"head_groups": 2}, "FASTUSP_OVERLAP": {}}
    assert res["parsed"] == ["FASTUSP_FP8", "FASTUSP", ["FASTUSP", "SDPA_FLASH", "FASTUSP_FP8"]]
    err = res["changed_error"]
    assert err is not None and "USP takes" in err and "_has_kv_cache is missing" in err, err
