"""Which image sizes and parallel degrees a checkpoint accepts: the one rule ``serve`` and ``demo`` both ask.

Read from the checkpoint's JSON files only (``model_index.json``, ``transformer/config.json``,
``vae/config.json``): no torch, no weights, so a wrong configuration is refused before any process
starts or any model loads. What it encodes, from xfuser 0.7.0 and diffusers 0.42:

* pixels per latent token row/column ``t = vae_scale_factor x packing x patch_size``: diffusers'
  ``vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)``; FLUX packs 2 x 2 latents into a
  token (``packing = 2``, its ``patch_size`` is 1), SD3 patches them (``packing = 1``). A width not a
  multiple of ``t`` is refused by SD3's ``check_inputs`` and silently shrunk by FLUX's.
* xfuser's ``DiTRuntimeState`` (``core/distributed/runtime_state.py``) takes
  ``vae_scale_factor x packing`` as its own scale factor and, in ``_calc_patches_metadata``, needs
  ``latents_height = height // that`` to be a multiple of ``patch_size x sp`` (``sp = ulysses x
  ring``; else "The height of the input is not divisible by the number of sequence parallel
  devices"): the image is split over the ranks by latent rows. So heights are multiples of
  ``t x sp``, widths of ``t``.
* SD3's positional embedding covers ``pos_embed_max_size`` patches per side: at most
  ``pos_embed_max_size x patch_size x vae_scale_factor`` pixels.
* ``_check_model_and_parallel_config``: ``ulysses_degree`` must divide the transformer's heads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

# Largest height/width the entry points accept unless told otherwise (serve --max_size; the demo).
DEFAULT_MAX_SIZE = {"tiny": 128, "model": 2048}
TINY_NAME = "tiny random-weight FLUX.1"


@dataclass(frozen=True)
class ModelGeometry:
    """What the size and degree rules need to know about a checkpoint."""

    family: str                 # model_index.json ``_class_name``: FluxPipeline, StableDiffusion3Pipeline
    heads: int                  # transformer attention heads
    vae_scale_factor: int       # diffusers' pipeline.vae_scale_factor
    patch_size: int             # transformer.config.patch_size
    packing: int                # latents packed per token side (2: FLUX)
    max_patches: int | None = None  # SD3 pos_embed_max_size (patches per side), None: unbounded

    @property
    def pixels_per_token(self) -> int:
        return self.vae_scale_factor * self.packing * self.patch_size

    @property
    def max_pixels(self) -> int | None:
        return None if self.max_patches is None else self.max_patches * self.patch_size * self.vae_scale_factor


# fastusp_xdit.xdit.tiny.build_tiny_flux: 4 heads, one VAE block (scale factor 1), patch size 1,
# FLUX packing (tests/test_serve.py checks this against a built one)
TINY_FLUX = ModelGeometry("FluxPipeline", heads=4, vae_scale_factor=1, patch_size=1, packing=2)


def _json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {what} ({path}): {e}") from None


def read_geometry(model: str) -> ModelGeometry:
    """The geometry of the diffusers checkpoint folder ``model``; ValueError (one line) if it is not one we run."""
    from ..xdit.pipeline import pipeline_family  # json only: no torch, no xfuser

    family = pipeline_family(model)
    transformer = _json(os.path.join(model, "transformer", "config.json"), "the transformer's config")
    vae = _json(os.path.join(model, "vae", "config.json"), "the VAE's config")
    try:
        heads = int(transformer["num_attention_heads"])
        patch = int(transformer.get("patch_size", 1))
        scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{model!r}: transformer/config.json lacks {e}") from None
    flux = family == "FluxPipeline"
    max_patches = None if flux else transformer.get("pos_embed_max_size", 96)
    return ModelGeometry(family, heads, scale, patch, 2 if flux else 1, max_patches)


@dataclass(frozen=True)
class SizeRule:
    """Heights multiple of ``height_multiple`` in [that, ``max_height``], widths likewise."""

    height_multiple: int
    width_multiple: int
    max_height: int
    max_width: int
    why: str  # how the multiples come about, for messages

    def problem(self, name: str, value: int) -> str | None:
        """None if ``value`` is a valid ``name`` ("height"/"width"), else a message naming valid ones."""
        m, top = self._of(name)
        if m <= value <= top and value % m == 0:
            return None
        near = sorted({v for v in (value // m * m, -(-value // m) * m) if m <= v <= top}) or [m if value < m else top]
        return (f"{name}={value} is not accepted: {name}s are multiples of {m} from {m} to {top} ({self.why}); "
                f"nearest: {' or '.join(map(str, near))}")

    def accepts(self, height: int, width: int) -> bool:
        return self.problem("height", height) is None and self.problem("width", width) is None

    def fit(self, preferred: int) -> tuple[int, int]:
        """The (height, width) nearest ``preferred`` from below (the smallest valid ones if none is)."""
        return tuple(max(m, min(preferred, top) // m * m) for m, top in (self._of("height"), self._of("width")))

    def describe(self) -> str:
        if (self.height_multiple, self.max_height) == (self.width_multiple, self.max_width):
            return f"height and width: multiples of {self.height_multiple} up to {self.max_height}"
        return (f"height: multiples of {self.height_multiple} up to {self.max_height}; "
                f"width: multiples of {self.width_multiple} up to {self.max_width}")

    def as_json(self) -> dict:
        return {"height": {"multiple_of": self.height_multiple, "min": self.height_multiple, "max": self.max_height},
                "width": {"multiple_of": self.width_multiple, "min": self.width_multiple, "max": self.max_width},
                "rule": self.why}

    def _of(self, name: str) -> tuple[int, int]:
        return (self.height_multiple, self.max_height) if name == "height" else (self.width_multiple, self.max_width)


def size_rule(geometry: ModelGeometry, ulysses: int = 1, ring: int = 1, max_size: int | None = None) -> SizeRule:
    """The sizes ``geometry`` accepts on ``ulysses x ring`` sequence-parallel ranks, capped at ``max_size``.

    ValueError if no size fits under the cap.
    """
    sp = ulysses * ring
    t = geometry.pixels_per_token
    caps = [c for c in (max_size, geometry.max_pixels) if c is not None]
    top = min(caps) if caps else 1 << 20
    why = (f"{t} px per token = VAE {geometry.vae_scale_factor} x packing {geometry.packing} x patch "
           f"{geometry.patch_size}")
    if sp > 1:
        why += f"; heights also x {sp} = ulysses {ulysses} x ring {ring} sequence-parallel ranks"
    rule = SizeRule(t * sp, t, top // (t * sp) * (t * sp), top // t * t, why)
    if rule.max_height < rule.height_multiple:
        raise ValueError(f"no height fits: heights must be multiples of {rule.height_multiple} ({why}) but the "
                         f"largest size allowed is {top}")
    return rule


def ulysses_choices(heads: int) -> list[int]:
    """Ulysses degrees xfuser accepts for ``heads`` heads (it divides them)."""
    return [u for u in range(1, heads + 1) if heads % u == 0]


def degree_problem(geometry: ModelGeometry, ulysses: int, name: str = "the model") -> str | None:
    """xfuser's head rule, as a message (None: fine)."""
    if ulysses >= 1 and geometry.heads % ulysses == 0:
        return None
    return (f"{name} has {geometry.heads} attention heads: the ulysses degree must divide them "
            f"({', '.join(map(str, ulysses_choices(geometry.heads)))}), not {ulysses}")


def valid_degrees(geometry: ModelGeometry, max_world: int, min_world: int = 2) -> list[tuple[int, int]]:
    """(ulysses, ring) pairs with ``min_world <= ulysses x ring <= max_world`` that the heads allow."""
    return [(u, w // u) for w in range(min_world, max_world + 1) for u in reversed(ulysses_choices(geometry.heads))
            if w % u == 0]
