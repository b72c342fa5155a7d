"""Communication: traceable collectives (and the FP8 codec they can carry)."""
from .collectives import all_to_all, ring_shift

__all__ = ["all_to_all", "ring_shift"]
