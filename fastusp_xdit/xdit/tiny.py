"""Tiny random-weight FLUX.1, SD3 and Qwen-Image pipelines, built offline in a few seconds (no hub access).

Components are sized like diffusers' own test dummies, with 4 attention heads so Ulysses degrees 2 and
4 divide them. Tokenizers are built from an in-memory character vocabulary (CLIP BPE without merges,
T5 unigram, Qwen2 byte-level BPE without merges). The saved folder loads with ``FluxPipeline`` /
``StableDiffusion3Pipeline`` / ``QwenImagePipeline`` and with xfuser's ``xFuserFluxPipeline`` /
``xFuserStableDiffusion3Pipeline`` / ``xFuserQwenImageTransformerWrapper`` (its transformer).

Sizes: FLUX has VAE scale factor 1 and packs 2x2 latents, so ``height`` and ``width`` must be even
(16 x 16 -> 64 image tokens); SD3 has VAE scale factor 1 and patch size 1 (8 x 8 -> 64 tokens); Qwen-Image
has VAE scale factor 4 and packs 2x2 latents (32 x 32 -> 16 tokens). Text tokens: CLIP 77, T5
``max_sequence_length``, Qwen one per prompt character.
"""
from __future__ import annotations

import os
import string

import torch

_CHARS = list(string.ascii_lowercase + string.digits + ".,!?'-")
_CLIP_LEN = 77


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {c: i for i, c in enumerate(_CHARS)}
    vocab.update({c + "</w>": len(_CHARS) + i for i, c in enumerate(_CHARS)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_LEN)


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_config(tokenizer):
    from transformers import CLIPTextConfig

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=_CLIP_LEN, projection_dim=32,
                          bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos,
                          pad_token_id=eos, hidden_act="gelu", layer_norm_eps=1e-5)


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _save(pipe, path) -> str:
    path = os.fspath(path)
    pipe.save_pretrained(path)
    return path


def build_tiny_flux(path, seed: int = 0) -> str:
    """Save a tiny random FLUX.1 pipeline (1 double + 1 single block, 4 heads x 16) to ``path``; return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(latent_channels=1),
            text_encoder=CLIPTextModel(_clip_config(clip_tok)),
            tokenizer=clip_tok,
            text_encoder_2=_t5_encoder(t5_tok),
            tokenizer_2=t5_tok,
            transformer=FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                               attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                               pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
        )
    return _save(pipe, path)


def build_tiny_sd3(path, seed: int = 0) -> str:
    """Save a tiny random SD3 pipeline (1 joint block, 4 heads x 8) to ``path``; return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                              attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                              joint_attention_dim=32, pooled_projection_dim=64, out_channels=4),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_vae(latent_channels=4),
            text_encoder=CLIPTextModelWithProjection(_clip_config(clip_tok)),
            tokenizer=clip_tok,
            text_encoder_2=CLIPTextModelWithProjection(_clip_config(clip_tok)),
            tokenizer_2=_clip_tokenizer(),
            text_encoder_3=_t5_encoder(t5_tok),
            tokenizer_3=t5_tok,
        )
    return _save(pipe, path)


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]  # GPT-2 byte map
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    tokenizer = Qwen2Tokenizer(vocab={c: i for i, c in enumerate(byte_chars + specials)}, merges=[],
                               model_max_length=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tokenizer


def build_tiny_qwen_image(path, seed: int = 0) -> str:
    """Save a tiny random Qwen-Image pipeline (1 block, 4 heads x 16; 2-layer Qwen2.5-VL) to ``path``; return it."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer()
    vocab = tokenizer.get_vocab()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, rope_theta=1e6, vocab_size=len(vocab),
                    rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})
        config = Qwen2_5_VLConfig(
            text_config=text, hidden_size=16, vocab_size=len(vocab),
            vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
            vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
            image_token_id=vocab["<|image_pad|>"])
        pipe = QwenImagePipeline(
            transformer=QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                                    attention_head_dim=16, num_attention_heads=4,
                                                    joint_attention_dim=16, axes_dims_rope=(8, 4, 4)),
            vae=AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                       temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                       latents_std=[1.0] * 4),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=Qwen2_5_VLForConditionalGeneration(config),
            tokenizer=tokenizer,
        )
    return _save(pipe, path)
