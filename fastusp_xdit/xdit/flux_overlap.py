"""FLUX overlap mode (``--attention_backend fastusp_overlap``): communication issued as compute finishes.

xfuser's FLUX processor computes Q, K and V, then one ``USP`` call sends them; a single-stream block
computes its MLP before the attention and waits for the output all-to-all right after it. With a
:data:`staged <.variants.Variant>` variant the two patched functions below instead run
:func:`~fastusp_xdit.usp.staged.usp_attention_staged`:

* ``xFuserFluxAttnProcessor.__call__``: V's all-to-all leaves as soon as V is projected, Q's after
  its RMSNorm and RoPE, then K's (dual-stream blocks: text tokens joined first, as xfuser does);
* diffusers' ``FluxSingleTransformerBlock.forward``: its MLP runs while the output all-to-all is in
  flight (the MLP does not read the attention output).

Both fall back to the original code for any other backend and wherever the staged path does not
apply (PipeFusion patches, fused QKV projections, AITER's fused norm/RoPE kernel, masks, extra
attention kwargs). Same math as the stock path; the tests check the outputs agree.
"""
from __future__ import annotations

import types

import torch

from . import hooks, model_fixes, usp_adapter
from .targets import check_module

FLUX_MODULE = "xfuser.model_executor.models.transformers.transformer_flux"

_stock: dict = {}  # "module": xfuser's FLUX module; "processor" / "single_block": the original functions


def _applies(attn, attention_mask=None, extra_kwargs=None) -> bool:
    """Whether this call takes the staged path (the backend asks for it and nothing rules it out)."""
    if not usp_adapter.staged_backend() or attention_mask is not None or extra_kwargs:
        return False
    if model_fixes.active() is not None:  # an uneven layout: USP's adapter applies it
        return False
    flux = _stock["module"]
    return (not flux._HAS_FLYDSL and not getattr(attn, "fused_projections", False)
            and flux.get_runtime_state().num_pipeline_patch == 1)


def _staged_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb, after=None):
    """(B, S, H*D) attention output of ``attn`` (text rows first when ``encoder_hidden_states`` is
    given, as xfuser joins them) and ``after()``'s result."""
    rope = _stock["module"].apply_rotary_emb
    text = encoder_hidden_states if attn.added_kv_proj_dim is not None else None

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    def projection(proj, norm, added_proj, added_norm, rotary):
        def fn():
            x = norm(heads(proj(hidden_states)))
            if text is not None:
                x = torch.cat([added_norm(heads(added_proj(text))), x], dim=1)
            if rotary and image_rotary_emb is not None:
                x = rope(x, image_rotary_emb, sequence_dim=1)
            return x.transpose(1, 2)
        return fn

    def ident(x):
        return x

    value_fn = projection(attn.to_v, ident, getattr(attn, "add_v_proj", None), ident, False)
    query_fn = projection(attn.to_q, attn.norm_q, getattr(attn, "add_q_proj", None),
                          getattr(attn, "norm_added_q", None), True)
    key_fn = projection(attn.to_k, attn.norm_k, getattr(attn, "add_k_proj", None),
                        getattr(attn, "norm_added_k", None), True)
    out, extra = usp_adapter.staged_usp(value_fn, query_fn, key_fn, after)
    return out.transpose(1, 2).flatten(2, 3), extra


def processor_call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                   image_rotary_emb=None):
    """``xFuserFluxAttnProcessor.__call__`` with the staged all-to-alls (see the module doc)."""
    if not _applies(attn, attention_mask):
        return _stock["processor"](self, attn, hidden_states, encoder_hidden_states, attention_mask,
                                   image_rotary_emb)
    out, _ = _staged_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
    if encoder_hidden_states is None:
        return out
    text, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]],
                                     dim=1)
    return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(text)


def single_block_forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                         joint_attention_kwargs=None):
    """``FluxSingleTransformerBlock.forward`` with the MLP behind the output all-to-all."""
    if not (_is_xfuser_attention(self.attn) and _applies(self.attn, None, joint_attention_kwargs)):
        return _stock["single_block"](self, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                      joint_attention_kwargs)
    text_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    normed, gate = self.norm(hidden_states, emb=temb)
    attn_out, mlp = _staged_attention(self.attn, normed, None, image_rotary_emb,
                                      after=lambda: self.act_mlp(self.proj_mlp(normed)))
    hidden_states = hidden_states + gate.unsqueeze(1) * self.proj_out(torch.cat([attn_out, mlp], dim=2))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_len], hidden_states[:, text_len:]


def _is_xfuser_attention(attn) -> bool:
    return isinstance(getattr(attn, "processor", None), _stock["module"].xFuserFluxAttnProcessor)


def _install(module: types.ModuleType) -> None:
    if "module" in _stock:
        return
    check_module(module)
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock as block

    _stock.update(module=module, processor=module.xFuserFluxAttnProcessor.__call__, single_block=block.forward)
    module.xFuserFluxAttnProcessor.__call__ = processor_call
    block.forward = single_block_forward


def install() -> None:
    """Patch xfuser's FLUX processor and the single-stream block as soon as xfuser's FLUX module loads."""
    hooks.after_import(FLUX_MODULE, _install)
