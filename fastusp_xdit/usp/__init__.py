"""The USP algorithm: pure functions of tensors and process groups (no xfuser).

``usp_attention`` (one packed all-to-all per direction, pipelined ring, head groups) and
``usp_attention_staged`` (each projection's all-to-all issued as it is computed) both compose the
public steps of :mod:`.steps` over one frozen :class:`.spec.CallSpec`.
"""
from .attention import usp_attention
from .staged import usp_attention_staged

__all__ = ["usp_attention", "usp_attention_staged"]
