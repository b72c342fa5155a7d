"""Does the local kernel's result depend on the memory layout of its inputs? (one GPU, no processes)

fastusp hands the local kernel token-major views ((S, B, H, D) memory seen as BHSD: no copy after the
all-to-all); stock xfuser hands it contiguous BHSD tensors. Same kernel, same values, other strides:
this records, per dtype and shape, how many output elements differ between the two layouts and by
how much (in units of the dtype's rounding step at the output's magnitude), for fastusp's
``attention_with_lse`` (cuDNN with the LSE) and for torch's SDPA. Writes ``$OUT/layout_probe.json``.

    python benchmarks/one_gpu/layout_probe.py
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from fastusp_xdit.ops import attention_with_lse, select_backend  # noqa: E402

SHAPES = [(2, 2, 256, 8), (2, 4, 256, 16), (1, 12, 4608, 128)]  # tiny PixArt/FLUX-like, a FLUX U2 rank


def main() -> dict:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for b, h, s, d in SHAPES:
            tm = [torch.randn(s, b, h, d, device="cuda", dtype=dtype, generator=g) for _ in range(3)]
            views = [x.permute(1, 2, 0, 3) for x in tm]           # token-major memory, BHSD view
            dense = [x.contiguous() for x in views]                # the same values, contiguous BHSD
            for name, fn in (("attention_with_lse", lambda q, k, v: attention_with_lse(q, k, v)[0]),
                             ("sdpa", torch.nn.functional.scaled_dot_product_attention)):
                a, c = fn(*views), fn(*dense)
                diff = (a.float() - c.float()).abs()
                step = torch.finfo(dtype).eps * c.float().abs().clamp_min(torch.finfo(dtype).tiny)
                rows.append(dict(kernel=name, backend=select_backend(dense[0]) if name != "sdpa" else "sdpa",
                                 dtype=str(dtype).split(".")[-1], shape=[b, h, s, d],
                                 differing=int((diff > 0).sum()), elements=diff.numel(),
                                 max_abs=diff.max().item(), max_steps=(diff / step).max().item()))
                print(rows[-1])
    # the output projection after attention: the (B, S, H*D) input as xfuser's processors build it from
    # fastusp's token-major output (a strided view) vs from a contiguous output
    for dtype in (torch.float16, torch.bfloat16):
        for b, s, h, d in ((2, 256, 4, 8), (2, 4608, 24, 128)):
            tm = torch.randn(s, b, h, d, device="cuda", dtype=dtype, generator=g)
            lin = torch.nn.Linear(h * d, h * d, device="cuda", dtype=dtype)
            strided = tm.permute(1, 0, 2, 3).reshape(b, s, h * d)     # BHSD.transpose(1, 2).reshape(...)
            dense = tm.permute(1, 0, 2, 3).contiguous().reshape(b, s, h * d)
            with torch.no_grad():
                diff = (lin(strided).float() - lin(dense).float()).abs()
            rows.append(dict(kernel="linear after attention", dtype=str(dtype).split(".")[-1], shape=[b, s, h * d],
                             input_is_view=strided.data_ptr() == tm.data_ptr(), differing=int((diff > 0).sum()),
                             elements=diff.numel(), max_abs=diff.max().item()))
            print(rows[-1])
    record = {"command": "python benchmarks/one_gpu/layout_probe.py", "device": torch.cuda.get_device_name(0),
              "versions": {"torch": torch.__version__}, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "layout_probe.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
