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
    # xfuser wrappers built around a transformer instance (xFuserTransformerBaseWrapper) rather than from its config
    wrap_instance: bool = False
    # (wrapped, inputs) -> output: how xfuser's *pipeline* feeds the wrapper, for families whose pipeline (not
    # the wrapper) splits the latents (default: call the wrapper with the full inputs)
    sp_call: Callable | None = None
    ring_ok: bool = True     # False: xfuser refuses ring > 1 for this family (Lumina2)
    wrap_kwargs: bool = False

    def build(self, seed: int = 0):
        import diffusers

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return getattr(diffusers, self.diffusers_cls)(**self.config).eval()

    def wrap(self, model):
        import importlib

        cls = getattr(importlib.import_module(self.wrapper[0]), self.wrapper[1])
        if self.wrap_instance:
            import copy

            return cls(copy.deepcopy(model)).eval()
        if self.wrap_kwargs:  # a wrapper whose __init__ takes only **kwargs: from_config would see no parameters
            wrapped = cls(**{k: v for k, v in model.config.items() if not k.startswith("_")})
        else:
            wrapped = cls.from_config(model.config)
        wrapped.load_state_dict(model.state_dict())
        return wrapped.eval()

    def run(self, wrapped, inputs: dict):
        """The wrapper's output for the full-sequence ``inputs``, fed as xfuser's pipeline feeds it."""
        return wrapped(**inputs) if self.sp_call is None else self.sp_call(wrapped, inputs)

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


def _latte_inputs(s, g):
    h, w = s["hw"]
    return dict(hidden_states=_r(g, 1, 4, s["frames"], h, w), timestep=torch.tensor([500]),
                encoder_hidden_states=_r(g, 1, s.get("text", 6), 8), enable_temporal_attentions=True, return_dict=False)


def _lumina2_inputs(s, g):
    h, w = s["hw"]
    t = s["text"]
    return dict(hidden_states=_r(g, 1, 4, 2 * h, 2 * w), timestep=torch.tensor([0.5]),
                encoder_hidden_states=_r(g, 1, t, 16), encoder_attention_mask=torch.ones(1, t, dtype=torch.long),
                return_dict=False)


def _z_image_inputs(s, g):
    h, w = s["hw"]
    return dict(x=[_r(g, 4, 1, 2 * h, 2 * w)], t=torch.tensor([0.5]), cap_feats=[_r(g, s["text"], 16)],
                return_dict=False)


def _height_split_call(wrapped, inputs):
    """What xfuser 0.7.0's video pipelines (``pipeline_latte.py``) do around the transformer with sequence
    parallelism: set the runtime's input size (its patch metadata splits the latent *height* over the sp
    ranks, raising where it does not divide), take this rank's rows (``_init_video_sync_pipeline``), and
    all-gather the rows of every rank after the step."""
    from xfuser.core.distributed import get_runtime_state, get_sequence_parallel_world_size, get_sp_group
    from xfuser.model_executor.pipelines.base_pipeline import xFuserPipelineBaseWrapper

    state = get_runtime_state()
    cfg = wrapped.config
    latents = inputs["hidden_states"]
    _, _, frames, h, w = latents.shape
    state._set_model_parameters(vae_scale_factor=1, backbone_patch_size=cfg.patch_size,
                                backbone_in_channel=cfg.in_channels,
                                backbone_inner_dim=cfg.num_attention_heads * cfg.attention_head_dim)
    state.ready = False
    state.set_video_input_parameters(height=h, width=w, num_frames=frames, batch_size=latents.shape[0])
    local = xFuserPipelineBaseWrapper._init_video_sync_pipeline(None, latents)
    out = sample(wrapped(**{**inputs, "hidden_states": local}))
    sp = get_sequence_parallel_world_size()
    if sp == 1:
        return out
    parts = get_sp_group().all_gather(out.contiguous(), separate_tensors=True)
    starts = state.pp_patches_start_idx_local
    return torch.cat([parts[r][:, :, :, starts[p]:starts[p + 1], :] for p in range(state.num_pipeline_patch)
                      for r in range(sp)], dim=-2)


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
    # Latte (temporal blocks on): xfuser's pipeline splits the latent height (patch rows) over the sp ranks and
    # refuses heights that do not divide patch_size * sp; "odd": an odd number of tokens per rank (5 patch
    # columns) and per frame sequence (3 frames)
    Family("latte", "LatteTransformer3DModel", ("xfuser.model_executor.models.transformers.latte_transformer_3d",
                                                "xFuserLatteTransformer3DWrapper"),
           dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=4,
                caption_channels=8, in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, video_length=3),
           _latte_inputs, {"even": {"frames": 3, "hw": (24, 8)}, "odd": {"frames": 3, "hw": (24, 10)}},
           wrap_instance=True, sp_call=_height_split_call),
    # Lumina2 (Ulysses only: xfuser refuses ring); [text | image] joined, zero-padded to the degree, and the
    # pad rows masked: xfuser then runs its SDPA backend itself (``backend=SDPA`` with the mask)
    Family("lumina2", "Lumina2Transformer2DModel", (f"{_XT}.transformer_lumina2", "xFuserLumina2Transformer2DWrapper"),
           dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
                num_attention_heads=4, num_kv_heads=2, multiple_of=4, axes_dim_rope=(4, 2, 2), axes_lens=(64, 64, 64),
                cap_feat_dim=16),
           _lumina2_inputs, {"even": {"hw": (4, 6), "text": 12}, "odd": {"hw": (4, 6), "text": 7}},
           wrap_instance=True, ring_ok=False),
    # Z-Image: diffusers pads image and caption tokens to multiples of 32 itself (pad tokens, attended by the
    # model); xfuser then zero-pads the image, caption and joint sequences to the sp degree
    # (``_chunk_and_pad_sequence``): degrees 2 and 4 always divide, 3 does not
    Family("z_image", "ZImageTransformer2DModel", (f"{_XT}.transformer_z_image", "xFuserZImageTransformer2DWrapper"),
           dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
                n_heads=4, n_kv_heads=4, qk_norm=True, cap_feat_dim=16, axes_dims=[4, 2, 2], axes_lens=[64, 32, 32]),
           _z_image_inputs, {"even": {"hw": (4, 6), "text": 12}, "odd": {"hw": (3, 5), "text": 7}}, wrap_kwargs=True),
)}


def family(name: str) -> Family:
    return FAMILIES[name]
