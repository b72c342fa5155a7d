"""The fastusp variants: the one place that spells their ``--attention_backend`` names.

Each :class:`Variant` says what :func:`fastusp_xdit.usp.usp_attention` gets for it (``usp_kwargs``:
the wire spec, head groups), whether FLUX attention runs staged
(:func:`~fastusp_xdit.usp.usp_attention_staged`, see :mod:`.flux_overlap`), which model families'
code it changes beyond ``USP``, and what a user is promised about its accuracy. The enum members
(:mod:`.backend`), the ``USP`` adapter, the FLUX overlap, doctor, demo, serve and the planner all
iterate :data:`VARIANTS`; none of them spells a variant name.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    """One ``--attention_backend`` name of fastusp."""

    name: str                  # what users type: ``fastusp_fp8``
    description: str           # the enum member's value, shown by doctor and the demo
    usp_kwargs: dict = field(default_factory=dict)  # extra usp_attention keyword arguments
    staged: bool = False       # FLUX attention runs usp_attention_staged (projections overlapped)
    models: tuple = ()         # model families whose code it changes beyond USP
    wire: str = "none"         # the wire spec it sends (a ``fastusp_xdit.comm.codecs.WireSpec`` string)
    tolerance: float = 1e-5    # attention-output error it promises vs input-dtype communication (fp32 inputs)

    @property
    def member(self) -> str:
        """The ``AttentionBackendType`` member name (``FASTUSP_FP8``)."""
        return self.name.upper()


def _variant(name, description, *, wire="none", head_groups=1, staged=False, models=(), tolerance=1e-5):
    kwargs = {}
    if wire != "none":
        kwargs["wire"] = wire
    if head_groups != 1:
        kwargs["head_groups"] = head_groups
    return Variant(name, description, kwargs, staged, models, wire, tolerance)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    _variant("fastusp", "FastUSP"),
    # e4m3 keeps 3 mantissa bits: ~2.6% rms per tensor, ~4.5% on the output with Q, V and O (decided)
    _variant("fastusp_fp8", "FastUSP, FP8 Q/V/O all-to-all", wire="qvo", tolerance=6e-2),
    # int8 with a per-row absmax scale keeps 7 bits: Q, K, V and O within 2e-2 (tests/test_usp_int8.py)
    _variant("fastusp_int8", "FastUSP, INT8 Q/K/V/O all-to-all", wire="qvo=int8,k=int8", tolerance=2e-2),
    # all-to-alls pipelined with attention over 2 head groups: 2 is the one count whose smaller cuDNN
    # calls cost ~2% on an H200 (benchmarks/results/micro-h200.json); the gain awaits a 2-GPU run.
    _variant("fastusp_pipelined", "FastUSP, all-to-alls pipelined over 2 head groups", head_groups=2),
    # FLUX blocks: Q/K/V all-to-alls issued per projection, output all-to-all behind the single block's
    # MLP (.flux_overlap); other models run plain fastusp. Opt-in until a 2-GPU run shows a gain.
    _variant("fastusp_overlap", "FastUSP, FLUX projections and MLP overlapped with the all-to-alls", staged=True,
             models=("flux",)),
)}


def plain() -> str:
    """The variant with no extra arguments, not staged, no model-specific code (the default backend)."""
    return next(v.name for v in VARIANTS.values() if not v.usp_kwargs and not v.staged and not v.models)


def eight_bit() -> tuple[str, ...]:
    """Every variant that sends 8-bit data (a wire spec), in registry order."""
    return tuple(v.name for v in VARIANTS.values() if v.wire != "none")


def by_member(member) -> Variant | None:
    """The variant of an ``AttentionBackendType`` member (or its name), None for xfuser's own backends."""
    name = getattr(member, "name", member)
    return VARIANTS.get(str(name).lower()) if name is not None else None
