"""xDiT's ``POST /generate`` request: schema, defaults and validation.

The schema is that of xDiT's HTTP service (``entrypoints/launch.py`` in xfuser 0.7.0)::

    {"prompt": str, "num_inference_steps": 50, "seed": 42, "cfg": 7.5,
     "height": 1024, "width": 1024, "save_disk_path": null}

``prompt`` is required; a field left out or given as ``null`` takes its default: xDiT's, except that
``height``/``width`` default to the size nearest 1024 (64 for the tiny model) that the loaded model
accepts at the service's degrees (:class:`Limits`, from :func:`fastusp_xdit.apps.sizes.size_rule`). The
body is at most 64 KiB (:data:`MAX_BODY_BYTES`). The server validates every request with
:func:`parse_request` on rank 0 before anything is broadcast to the other ranks, so a bad request never
reaches the pipeline: each failure is a :class:`RequestError` carrying the HTTP status (400, or 413
for an oversized body) and a message naming the fix. ``save_disk_path`` is then confined to the
service's output folder (:mod:`.serve_output`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .sizes import SizeRule

DEFAULTS = {"num_inference_steps": 50, "seed": 42, "cfg": 7.5, "height": 1024, "width": 1024, "save_disk_path": None}
FIELDS = ("prompt", *DEFAULTS)
MAX_BODY_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 4096
MAX_SEED = 2**63 - 1


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What the loaded pipeline accepts (``sizes``, steps up to ``max_steps``) and the defaults that fit it."""

    sizes: SizeRule
    max_steps: int
    defaults: dict = field(default_factory=dict)  # height, width, num_inference_steps when left out

    @classmethod
    def fitting(cls, sizes: SizeRule, max_steps: int, preferred_size: int = DEFAULTS["height"]) -> "Limits":
        """xDiT's defaults where they fit; else the size nearest ``preferred_size`` and at most ``max_steps``."""
        height, width = sizes.fit(preferred_size)
        return cls(sizes, max_steps, {"height": height, "width": width,
                                      "num_inference_steps": min(DEFAULTS["num_inference_steps"], max_steps)})


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    num_inference_steps: int = DEFAULTS["num_inference_steps"]
    seed: int = DEFAULTS["seed"]
    cfg: float = DEFAULTS["cfg"]
    height: int = DEFAULTS["height"]
    width: int = DEFAULTS["width"]
    save_disk_path: str | None = None


def _int(data: dict, name: str, low: int, high: int, hint: str = "") -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(f"{name}={value} is out of range: use {low} <= {name} <= {high}{hint}")
    return value


def parse_request(body: bytes, limits: Limits) -> GenerateRequest:
    """Decode and validate a ``/generate`` body; :class:`RequestError` for anything the pipeline must not see."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(too_large(len(body)), status=413)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(f"body must be a JSON object with fields {', '.join(FIELDS)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}: accepted fields are {', '.join(FIELDS)}")
    data = {**DEFAULTS, **limits.defaults, **{k: v for k, v in data.items() if v is not None}}
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt is required: a non-empty string")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    steps = _int(data, "num_inference_steps", 1, limits.max_steps, " (the server's --max_steps)")
    seed = _int(data, "seed", 0, MAX_SEED)
    size = {}
    for name in ("height", "width"):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"{name} must be an integer, got {json.dumps(value)}")
        problem = limits.sizes.problem(name, value)
        if problem:
            top = limits.sizes.max_height if name == "height" else limits.sizes.max_width
            raise RequestError(problem + (" (the largest: the server's --max_size, or the model's)" if value > top
                                          else ""))
        size[name] = value
    cfg = data["cfg"]
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise RequestError(f"cfg must be a finite number >= 0, got {json.dumps(cfg)}")
    path = data["save_disk_path"]
    if path is not None and (not isinstance(path, str) or not path or "\0" in path or len(path) > 4096):
        raise RequestError("save_disk_path must be a folder inside the service's output folder (a non-empty "
                           "string) or null")
    return GenerateRequest(prompt=prompt, num_inference_steps=steps, seed=seed, cfg=float(cfg),
                           height=size["height"], width=size["width"], save_disk_path=path)


def too_large(length: int) -> str:
    return f"request body of {length} bytes exceeds the {MAX_BODY_BYTES // 1024} KiB limit ({MAX_BODY_BYTES} bytes)"


def _reject_constant(name: str):
    raise RequestError(f"{name} is not a JSON number")
