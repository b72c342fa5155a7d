"""Tiny random-weight diffusers transformers and their xfuser 0.7.0 wrappers, for shape tests (no hub access).

:func:`family` gives a :class:`Family`: ``build(seed)`` the plain diffusers transformer (4 heads, one block
of each kind; fp32), ``wrap(model)`` xfuser's sequence-parallel wrapper class holding the same weights
(as xfuser's runner builds it), ``inputs(shape, seed)`` the forward keywords for a token layout, and
``sample(out)`` the output tensor. Shapes are per family (``Family.shapes``): ``"even"`` divides 2, 3 and
4 ranks' worth of tokens where the family allows; the others do not (see each ``shapes`` entry).
Everything is a pure function of the seed, so every rank builds identical weights and inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

_XT = "xfuser.model_executor.models.transformers"


@dataclass(frozen=True)
class Family:
    name: str
    diffusers_cls: str
    wrapper: tuple           # (module, class) of xfuser's wrapper
    config: dict
    make_inputs: Callable    # (shape: dict, generator) -> forward kwargs
    shapes: dict = field(default_factory=dict)

    def build(self, seed: int = 0):
        import diffusers

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return getattr(diffusers, self.diffusers_cls)(**self.config).eval()

    def wrap(self, model):
        import importlib

        cls = getattr(importlib.import_module(self.wrapper[0]), self.wrapper[1])
        wrapped = cls.from_config(model.config)
        wrapped.load_state_dict(model.state_dict())
        return wrapped.eval()

    def inputs(self, shape: str, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        return self.make_inputs(self.shapes[shape], g)


def sample(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out if isinstance(out, torch.Tensor) else out.sample


def _r(g, *shape):
    return torch.randn(*shape, generator=g)


def _wan_inputs(s, g):
    f, h, w = s["fhw"]
    return dict(hidden_states=_r(g, 1, 4, f, 2 * h, 2 * w), timestep=torch.tensor([500.0]),
                encoder_hidden_states=_r(g, 1, s.get("text", 8), 16), return_dict=False)


def _flux2_inputs(s, g):
    h, w = s["hw"]
    t = s["text"]
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h * 1.0), torch.arange(w * 1.0), torch.zeros(1),
                                         indexing="ij"), -1).reshape(1, h * w, 4)
    txt_ids = torch.zeros(1, t, 4)
    txt_ids[..., 3] = torch.arange(t * 1.0)
    return dict(hidden_states=_r(g, 1, h * w, 4), encoder_hidden_states=_r(g, 1, t, 16), timestep=torch.tensor([0.5]),
                img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([3.5]), return_dict=False)


def _qwen_inputs(s, g):
    h, w = s["hw"]
    return dict(hidden_states=_r(g, 1, h * w, 16), encoder_hidden_states=_r(g, 1, s["text"], 16),
                timestep=torch.tensor([0.5]), img_shapes=[(1, h, w)], return_dict=False)


def _hunyuan_video_inputs(s, g):
    f, h, w = s["fhw"]
    t = s["text"]
    return dict(hidden_states=_r(g, 1, 4, f, h, w), timestep=torch.tensor([500.0]),
                encoder_hidden_states=_r(g, 1, t, 16), encoder_attention_mask=torch.ones(1, t),
                pooled_projections=_r(g, 1, 8), guidance=torch.tensor([3500.0]), return_dict=False)


def _flux1_inputs(s, g):
    h, w = s["hw"]
    t = s["text"]
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h * 1.0), torch.arange(w * 1.0), indexing="ij"),
                          -1).reshape(h * w, 3)
    return dict(hidden_states=_r(g, 1, h * w, 4), encoder_hidden_states=_r(g, 1, t, 32),
                pooled_projections=_r(g, 1, 32), timestep=torch.tensor([0.5]), img_ids=img_ids,
                txt_ids=torch.zeros(t, 3), return_dict=False)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    # Wan 2.1 / 2.2 (same wrapper): patch (1, 2, 2); "odd": 1x3x5 = 15 patches
    Family("wan", "WanTransformer3DModel", (f"{_XT}.transformer_wan", "xFuserWanTransformer3DWrapper"),
           dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32),
           _wan_inputs, {"even": {"fhw": (2, 2, 3)}, "odd": {"fhw": (1, 3, 5)}, "odd7": {"fhw": (1, 1, 7)}}),
    # FLUX.2: image (h x w patches) zero-padded, text torch.chunk'ed
    Family("flux2", "Flux2Transformer2DModel", (f"{_XT}.transformer_flux2", "xFuserFlux2Transformer2DWrapper"),
           dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=16, timestep_guidance_channels=32,
                axes_dims_rope=(4, 4, 4, 4)),
           _flux2_inputs, {"even": {"hw": (4, 6), "text": 12}, "odd": {"hw": (3, 5), "text": 12},
                           "odd_text": {"hw": (4, 6), "text": 7}, "odd_both": {"hw": (3, 5), "text": 7}}),
    # Qwen-Image: text (one token per prompt token) and image both zero-padded
    Family("qwen", "QwenImageTransformer2DModel", (f"{_XT}.transformer_qwen", "xFuserQwenImageTransformerWrapper"),
           dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
           _qwen_inputs, {"even": {"hw": (4, 6), "text": 12}, "odd": {"hw": (3, 5), "text": 7}}),
    # HunyuanVideo: image torch.chunk'ed; text sharded when it divides the degree, else joint ("rear")
    Family("hunyuan_video", "HunyuanVideoTransformer3DModel",
           (f"{_XT}.transformer_hunyuan_video", "xFuserHunyuanVideoTransformer3DWrapper"),
           dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=10, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
           _hunyuan_video_inputs, {"even": {"fhw": (2, 2, 3), "text": 12}, "odd": {"fhw": (1, 3, 5), "text": 12},
                                   "odd_text": {"fhw": (1, 3, 5), "text": 7}}),
    # FLUX.1 through the runner's wrapper (xFuserFlux1Transformer2DWrapper)
    Family("flux1_runner", "FluxTransformer2DModel", (f"{_XT}.transformer_flux", "xFuserFlux1Transformer2DWrapper"),
           dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
           _flux1_inputs, {"even": {"hw": (4, 6), "text": 12}, "odd_text": {"hw": (4, 6), "text": 7},
                           "odd": {"hw": (3, 5), "text": 12}, "odd_both": {"hw": (3, 5), "text": 7}}),
)}


def family(name: str) -> Family:
    return FAMILIES[name]
