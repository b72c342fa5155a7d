"""Which fastusp variants the entry points default to or show, picked from :data:`..xdit.variants.VARIANTS`
by what they do (no variant name is spelled outside the registry)."""
from __future__ import annotations

from ..xdit.variants import VARIANTS


def plain() -> str:
    """The variant with no extra arguments, not staged, no model-specific code (serve's default backend)."""
    return next(v.name for v in VARIANTS.values() if not v.usp_kwargs and not v.staged and not v.models)


def eight_bit() -> tuple[str, ...]:
    """Every variant that sends 8-bit data (a wire spec), in registry order."""
    return tuple(v.name for v in VARIANTS.values() if v.wire != "none")


def eight_bit_idle(ulysses: int) -> dict:
    """{variant: note} for the 8-bit variants that quantize nothing at this Ulysses degree: their wire acts on
    the Ulysses all-to-alls only (unless it names the ring's K/V), and at ulysses 1 none runs."""
    return {v.name: f"ulysses 1: no all-to-all ran, nothing was sent in 8 bits (same as {plain()})"
            for v in VARIANTS.values() if v.wire != "none" and ulysses == 1 and "ring_kv" not in v.wire}
