"""fastusp inside xDiT (xfuser 0.7.0): ``--attention_backend fastusp`` and its variants.

The only code that touches xfuser. :func:`activate` wires four pieces, each landing the moment its
xfuser module loads (or at once if it already has):

* :mod:`.compat` -- on machines without an accelerator, the in-memory patches xfuser needs to import
  and run on CPU/gloo;
* :mod:`.backend` -- the ``FASTUSP*`` members of ``AttentionBackendType`` (one per :data:`.variants.VARIANTS` entry)
  and their registry kernel;
* :mod:`.usp_adapter` -- the replacement ``USP`` that routes fastusp members to
  :func:`fastusp_xdit.usp.usp_attention`;
* :mod:`.flux_overlap` -- with ``fastusp_overlap``, FLUX blocks issue each projection's all-to-all as
  it finishes and run the single-stream MLP behind the output all-to-all.

:mod:`.targets` lists every xfuser symbol involved; :mod:`.tiny` builds tiny offline pipelines.
"""
from __future__ import annotations


def activate() -> None:
    """Make xfuser accept and run the fastusp backends in this process (idempotent).

    Call it in every process that runs xfuser (torchrun children, Ray actors), before the runtime
    state is created. On a CPU-only machine call it before ``import xfuser``; elsewhere before or after.
    """
    from . import backend, compat, flux_overlap, model_fixes, usp_adapter

    compat.install()
    backend.install()
    usp_adapter.install()
    flux_overlap.install()
    model_fixes.install()


__all__ = ["activate"]
