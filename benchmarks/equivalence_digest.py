"""SHA-256 digests of ``usp_attention`` / ``usp_attention_staged`` outputs on fixed-seed CPU cases.

A restructuring must leave every output bitwise unchanged: run this before and after, on the same
machine, and compare the two JSON files (``--compare OLD.json``). Cases cover Ulysses, ring and 2x2,
joint front/rear, GQA, uneven lengths, head groups, the staged entry and every 8-bit spec.

    python benchmarks/equivalence_digest.py --out benchmarks/results/equivalence-cpu-after.json \
        --compare benchmarks/results/equivalence-cpu-before.json
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import subprocess
import sys

CASES = [
    dict(u=2, r=1), dict(u=1, r=2), dict(u=2, r=2), dict(u=4, r=1), dict(u=1, r=4),
    dict(u=2, r=1, joint="front"), dict(u=2, r=2, joint="rear"), dict(u=1, r=2, joint="front"),
    dict(u=2, r=1, kv_heads=2), dict(u=4, r=1, kv_heads=2), dict(u=2, r=2, seq=37),
    dict(u=2, r=1, head_groups=2), dict(u=4, r=1, head_groups=2, seq=29),
    dict(u=2, r=1, dtype="bfloat16"), dict(u=2, r=2, dtype="bfloat16", joint="front"),
    dict(u=2, r=1, fp8="qvo"), dict(u=2, r=1, fp8="qvo,k"), dict(u=2, r=2, fp8="qvo,k,ring_kv"),
    dict(u=1, r=2, fp8="qvo,k,ring_kv", dtype="bfloat16"), dict(u=2, r=1, fp8="qvo", head_groups=2),
    dict(u=2, r=1, fp8="qvo,k", dtype="bfloat16"), dict(u=2, r=2, fp8="qvo,k", dtype="float16", joint="rear"),
    dict(u=2, r=1, staged=True), dict(u=2, r=2, staged=True, joint="front"), dict(u=2, r=1, staged=True, fp8="qvo"),
]


def _digest(t) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()[:16]


def _worker(cases):
    import torch

    from fastusp_xdit import layout, usp_attention, usp_attention_staged
    from fastusp_xdit.usp.groups import usp_groups

    out, groups = [], {}
    for c in cases:
        u, r = c["u"], c["r"]
        if (u, r) not in groups:
            groups[(u, r)] = usp_groups(u, r)
        ug, rg = groups[(u, r)]
        sp = (0 if rg is None else rg.rank()) * u + (0 if ug is None else ug.rank())
        g = torch.Generator().manual_seed(1234)
        dtype = getattr(torch, c.get("dtype", "float32"))
        h, hkv, s, d = 8, c.get("kv_heads", 8), c.get("seq", 32), 16
        q, k, v = (torch.randn(2, n, s, d, generator=g).to(dtype) for n in (h, hkv, hkv))
        k = k + 3.0 * torch.randn(d, generator=g).to(dtype)  # per-channel offsets (what centring is for)
        joint = {}
        if c.get("joint"):
            joint = dict(joint_query=torch.randn(2, h, 5, d, generator=g).to(dtype),
                         joint_key=torch.randn(2, hkv, 5, d, generator=g).to(dtype),
                         joint_value=torch.randn(2, hkv, 5, d, generator=g).to(dtype), joint_strategy=c["joint"])
        ql, kl, vl = (layout.shard(t, 2, sp, u, r) for t in (q, k, v))
        kw = dict(ulysses_group=ug, ring_group=rg, fp8=c.get("fp8"), **joint)
        if c.get("staged"):
            res, _ = usp_attention_staged(lambda: vl, lambda: ql, lambda: kl, seq_len=s, **kw)
        else:
            res = usp_attention(ql, kl, vl, seq_len_q=s, seq_len_kv=s, head_groups=c.get("head_groups", 1), **kw)
        out.append(_digest(res))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="an earlier output of this script: exit 1 unless every digest matches")
    args = ap.parse_args(argv)
    import torch

    from fastusp_xdit.apps.launch import run_distributed

    digests = {}
    for world in (2, 4):
        cases = [c for c in CASES if c["u"] * c["r"] == world]
        per_rank = run_distributed(_worker, world, cases, timeout=300)
        for i, c in enumerate(cases):
            digests[json.dumps(c, sort_keys=True)] = [per_rank[rank][i] for rank in range(world)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"command": "python " + " ".join(sys.argv), "device": platform.machine(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "checkout": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "digests": digests}
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)["digests"]
        changed = sorted(k for k in old if digests.get(k) != old[k])
        record["compared_with"] = args.compare
        record["changed"] = changed
        print(f"{len(old) - len(changed)} of {len(old)} cases bitwise equal" + "".join(f"\n  changed: {k}" for k in changed))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 1 if record.get("changed") else 0


if __name__ == "__main__":
    sys.exit(main())
