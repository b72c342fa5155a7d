"""Every xfuser symbol (and diffusers method) that ``fastusp_xdit.xdit`` reads or replaces, with the shape it expects.

Written against xfuser 0.7.0 (PyPI wheel). Each patch calls :func:`check_module` on its module before
touching it, so a changed xfuser fails at the first import with the list of what moved, never
silently; :func:`check_xfuser` checks everything at once (used by the tests).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import types

XFUSER_VERSION = "0.7.0"

_USP_PARAMS = ("query", "key", "value", "dropout_p", "is_causal", "joint_query", "joint_key", "joint_value",
               "joint_strategy", "attn_layer", "combine_qkv_a2a", "backend", "attention_kwargs",
               "head_balance_layer", "kv_head_repeat")

# module -> {attribute: parameter names of a callable, or None for a non-callable value}
TARGETS: dict[str, dict[str, tuple | None]] = {
    # compat.py (CPU-only machines)
    "xfuser.envs": {"get_device_version": (), "get_torch_distributed_backend": (), "PACKAGES_CHECKER": None},
    "xfuser.core.sparge_attention.sparge": {"get_block_map_meansim": None},
    "xfuser.core.distributed.group_coordinator": {"synchronize": None},
    "xfuser.core.distributed.fp8_comms": {"PROCESS_GROUP": None},
    "xfuser.core.sparge_attention.head_balance": {"PROCESS_GROUP": None},
    # backend.py
    "xfuser.core.distributed.attention_backend": {
        "AttentionBackendType": None, "ATTENTION_FUNCTION_REGISTRY": None,
        "register_attention_function": ("backend_type",)},
    # usp_adapter.py (and compat.py: PROCESS_GROUP)
    "xfuser.model_executor.layers.usp": {
        "USP": _USP_PARAMS, "PROCESS_GROUP": None,
        "_has_kv_cache": ("attn_layer",), "_update_and_get_kv_cache": ("key", "value", "attn_layer"),
        "get_runtime_state": (), "get_ulysses_parallel_world_size": (), "get_ring_parallel_world_size": ()},
    # flux_overlap.py
    "xfuser.model_executor.models.transformers.transformer_flux": {
        "xFuserFluxAttnProcessor": None, "_HAS_FLYDSL": None, "apply_rotary_emb": None, "get_runtime_state": (),
        "xFuserFlux1Transformer2DWrapper": None},  # and model_fixes.py
    # model_fixes.py (each fix wraps one method and reads the runtime / sp helpers it names)
    "xfuser.model_executor.models.transformers.transformer_wan": {
        "xFuserWanTransformer3DWrapper": None, "get_sp_group": ()},
    "xfuser.model_executor.models.transformers.transformer_flux2": {"xFuserFlux2Transformer2DWrapper": None},
    "xfuser.model_executor.models.transformers.transformer_qwen": {
        "xFuserQwenImageTransformerWrapper": None, "chunk_and_pad_sequence": ("x", "sp_world_rank", "sp_world_size",
                                                                               "pad_amount", "dim")},
    "xfuser.model_executor.models.transformers.transformer_hunyuan_video": {
        "xFuserHunyuanVideoTransformer3DWrapper": None, "get_sp_group": ()},
    "xfuser.model_executor.layers.attention_processor": {"xFuserAttnProcessor2_0": None},
    "xfuser.model_executor.models.transformers.transformer_z_image": {"xFuserZImageTransformer2DWrapper": None},
}

# patched module -> [(module, class, method, parameter names)]: methods flux_overlap.py replaces when it loads
METHODS: dict[str, list[tuple[str, str, str, tuple]]] = {
    "xfuser.model_executor.models.transformers.transformer_flux": [
        ("xfuser.model_executor.models.transformers.transformer_flux", "xFuserFluxAttnProcessor", "__call__",
         ("self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")),
        ("diffusers.models.transformers.transformer_flux", "FluxSingleTransformerBlock", "forward",
         ("self", "hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")),
        ("xfuser.model_executor.models.transformers.transformer_flux", "xFuserFlux1Transformer2DWrapper", "forward",
         ("self", "hidden_states", "encoder_hidden_states", "args", "timestep", "img_ids", "txt_ids", "kwargs")),
    ],
    # model_fixes.py: the wrapper forwards (and Latte's processor) it wraps
    "xfuser.model_executor.models.transformers.transformer_wan": [
        ("xfuser.model_executor.models.transformers.transformer_wan", "xFuserWanTransformer3DWrapper", "forward",
         ("self", "hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image", "return_dict",
          "attention_kwargs"))],
    "xfuser.model_executor.models.transformers.transformer_flux2": [
        ("xfuser.model_executor.models.transformers.transformer_flux2", "xFuserFlux2Transformer2DWrapper", "forward",
         ("self", "hidden_states", "encoder_hidden_states", "args", "timestep", "img_ids", "txt_ids", "kwargs"))],
    "xfuser.model_executor.models.transformers.transformer_qwen": [
        ("xfuser.model_executor.models.transformers.transformer_qwen", "xFuserQwenImageTransformerWrapper", "forward",
         ("self", "hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes",
          "txt_seq_lens", "guidance", "attention_kwargs", "controlnet_block_samples", "additional_t_cond",
          "return_dict"))],
    "xfuser.model_executor.models.transformers.transformer_hunyuan_video": [
        ("xfuser.model_executor.models.transformers.transformer_hunyuan_video",
         "xFuserHunyuanVideoTransformer3DWrapper", "forward",
         ("self", "hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
          "pooled_projections", "guidance", "attention_kwargs", "return_dict"))],
    "xfuser.model_executor.models.transformers.transformer_z_image": [
        ("xfuser.model_executor.models.transformers.transformer_z_image", "xFuserZImageTransformer2DWrapper",
         "_chunk_and_pad_sequence", ("self", "x", "sp_world_rank", "sp_world_size", "pad_amount", "dim")),
        ("xfuser.model_executor.models.transformers.transformer_z_image", "xFuserZImageTransformer2DWrapper",
         "_gather_and_unpad", ("self", "x", "pad_amount", "dim")),
        ("xfuser.model_executor.models.transformers.transformer_z_image", "xFuserZImageTransformer2DWrapper",
         "forward", ("self", "x", "t", "cap_feats", "patch_size", "f_patch_size", "return_dict"))],
    "xfuser.model_executor.layers.attention_processor": [
        ("xfuser.model_executor.layers.attention_processor", "xFuserAttnProcessor2_0", "__call__",
         ("self", "attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb",
          "latte_temporal_attention", "args", "kwargs"))],
}


def _problems(module: types.ModuleType) -> list[str]:
    out = _method_problems(module.__name__)
    for attr, params in TARGETS.get(module.__name__, {}).items():
        if not hasattr(module, attr):
            out.append(f"{module.__name__}.{attr} is missing")
            continue
        if params is None:
            continue
        obj = getattr(module, attr)
        try:
            got = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            out.append(f"{module.__name__}.{attr} is no longer a plain function")
            continue
        if got != params:
            out.append(f"{module.__name__}.{attr} takes {got}, expected {params}")
    return out


def _method_problems(module_name: str) -> list[str]:
    out = []
    for mod, cls, name, params in METHODS.get(module_name, []):
        method = getattr(getattr(importlib.import_module(mod), cls, None), name, None)
        got = None if method is None else tuple(inspect.signature(method).parameters)
        if got != params:
            out.append(f"{mod}.{cls}.{name} takes {got}, expected {params}")
    return out


def _raise(problems: list[str]):
    try:
        version = importlib.metadata.version("xfuser")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    raise RuntimeError(f"fastusp_xdit.xdit targets xfuser {XFUSER_VERSION}, found {version}, and these symbols "
                       "changed: " + "; ".join(problems) + ". Update fastusp_xdit/xdit/ for this xfuser.")


def check_module(module: types.ModuleType) -> None:
    """Raise ``RuntimeError`` if ``module`` lacks a symbol we patch or its signature changed."""
    problems = _problems(module)
    if problems:
        _raise(problems)


def check_xfuser() -> None:
    """Import every target module and check all symbols (requires an importable xfuser)."""
    problems = []
    for name in TARGETS:
        problems += _problems(importlib.import_module(name))
    if problems:
        _raise(problems)
