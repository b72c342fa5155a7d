#!/usr/bin/env bash
# The one-GPU suite: ONE call on a lent H200, from the repo root, with `.whl` carried (<= 9 minutes):
#
#   bash benchmarks/one_gpu/gpu_suite.sh
#
# 1. installs the carried wheels (xfuser, yunchang, diffusers, distvae, bs4, soupsieve, transformers)
#    into /tmp/site, PYTHONPATH=/tmp/site:$PWD (fastusp_xdit from the checkout; no .pth autoload);
# 2. at once: tests/test_usp_one_gpu_cuda.py (usp_attention on 2/3/4 processes sharing cuda:0 over gloo)
#    and tests/xdit/test_one_gpu_cuda.py (the examples and xfuser's runner through
#    benchmarks/one_gpu/launch.py);
# 3. at once: tests/test_ops_cuda.py and tests/test_int8_codec.py (if present);
# 4. alone (timings): benchmarks/int8_codec.py and benchmarks/fp8_codec.py (if present).
#
# Everything it prints also goes to $OUT/suite.log; $OUT also gets junit.xml (every pytest run merged),
# one_gpu_cells.json (every cell of the example matrix) and the benchmarks' JSON: at most 8 files.
# Each step has a timeout inside an overall budget (SUITE_BUDGET_S, default 510 s); a step that would
# not fit is skipped and says so. Exit status: 0 only if every step that ran passed.
set -o pipefail
cd "$(dirname "$0")/../.." || exit 2
REPO=$PWD
OUT=${OUT:-$REPO/out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_suite.XXXXXX)
BUDGET=${SUITE_BUDGET_S:-540}
T0=$(date +%s)

left() { echo $((BUDGET - ($(date +%s) - T0))); }
cap() {  # cap WANTED -> min(WANTED, time left - 15), or nothing when < 20 s would be left
    local l=$(($(left) - 15)) w=$1
    [ "$l" -lt 20 ] && return 1
    [ "$w" -gt "$l" ] && w=$l
    echo "$w"
}

main() {
    local status=0
    echo "== gpu_suite $(date -u +%FT%TZ) on $(hostname); budget ${BUDGET} s; OUT=$OUT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || { echo "wheel install FAILED"; return 2; }
        ls .whl
    else
        echo "no .whl/ carried: using what is installed"
    fi
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
    export FASTUSP_XDIT_AUTOLOAD=0 FASTUSP_RESULTS_DIR=$OUT
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python3 - <<'EOF' || { echo "import check FAILED"; return 2; }
import importlib.metadata as md, sys, torch
for n in ("torch", "triton", "xfuser", "yunchang", "diffusers", "transformers", "huggingface_hub", "tokenizers"):
    try:
        print(f"  {n} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"  {n} MISSING")
print("  cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
from fastusp_xdit.xdit import activate
activate()
import xfuser, diffusers, transformers, yunchang  # noqa: F401
import fastusp_xdit
print("  fastusp_xdit", fastusp_xdit.__version__, "from", fastusp_xdit.__file__)
EOF

    # step NAME TIMEOUT PYTEST-ARGS...: one pytest run, junit to $WORK, output to $WORK/NAME.log
    step() {
        local name=$1 want=$2 t
        shift 2
        if ! t=$(cap "$want"); then
            echo "== $name: SKIPPED (budget spent)" >"$WORK/$name.log"
            return 0
        fi
        echo "== $name: pytest $* (timeout ${t} s)" >"$WORK/$name.log"
        timeout -k 10 "$t" python3 -m pytest -q -rfEs -p no:cacheprovider --timeout "$((t - 5))" \
            --junitxml "$WORK/junit-$name.xml" "$@" >>"$WORK/$name.log" 2>&1
        local rc=$?
        [ "$rc" -eq 124 ] && echo "== $name: TIMED OUT after ${t} s" >>"$WORK/$name.log"
        echo "== $name: exit $rc" >>"$WORK/$name.log"
        return $rc
    }
    show() { cat "$WORK/$1.log"; }

    echo "== phase 1 (concurrent): usp on one GPU, xDiT examples + runner on one GPU   [$(left) s left]"
    step usp_one_gpu 300 tests/test_usp_one_gpu_cuda.py &
    local p1=$!
    (export FASTUSP_ONE_GPU_MAX_PROCS=${FASTUSP_ONE_GPU_MAX_PROCS:-10}; step xdit_one_gpu 470 tests/xdit/test_one_gpu_cuda.py) &
    local p2=$!
    wait $p1 || status=1
    wait $p2 || status=1
    show usp_one_gpu
    show xdit_one_gpu

    echo "== phase 2 (concurrent): ops and int8 codec on CUDA   [$(left) s left]"
    step ops_cuda 150 tests/test_ops_cuda.py &
    local p3=$!
    local p4=""
    if [ -f tests/test_int8_codec.py ]; then
        step int8_codec_test 150 tests/test_int8_codec.py &
        p4=$!
    else
        echo "== tests/test_int8_codec.py not present: skipped" >"$WORK/int8_codec_test.log"
    fi
    wait $p3 || status=1
    [ -n "$p4" ] && { wait "$p4" || status=1; }
    show ops_cuda
    show int8_codec_test

    echo "== phase 3 (alone): codec benchmarks   [$(left) s left]"
    for bench in int8_codec fp8_codec; do
        if [ ! -f "benchmarks/$bench.py" ]; then
            echo "== benchmarks/$bench.py not present: skipped"
            continue
        fi
        local t rc
        if ! t=$(cap 180); then
            echo "== $bench: SKIPPED (budget spent)"
            continue
        fi
        echo "== python benchmarks/$bench.py (timeout ${t} s)"
        OUT=$OUT timeout -k 5 "$t" python3 "benchmarks/$bench.py"
        rc=$?
        if [ "$rc" -eq 124 ] && t=$(cap 90); then
            echo "== $bench timed out: again with --quick (timeout ${t} s)"
            OUT=$OUT timeout -k 5 "$t" python3 "benchmarks/$bench.py" --quick
            rc=$?
        fi
        echo "== $bench: exit $rc"
        [ "$rc" -eq 0 ] || status=1
    done

    python3 - "$WORK" "$OUT/junit.xml" <<'EOF'
import glob, sys, xml.etree.ElementTree as ET
root = ET.Element("testsuites")
for path in sorted(glob.glob(sys.argv[1] + "/junit-*.xml")):
    try:
        tree = ET.parse(path).getroot()
    except ET.ParseError as exc:
        print(f"junit {path}: {exc}")
        continue
    for suite in ([tree] if tree.tag == "testsuite" else list(tree)):
        suite.set("name", path.rsplit("junit-", 1)[1][:-4])
        root.append(suite)
ET.ElementTree(root).write(sys.argv[2], encoding="utf-8", xml_declaration=True)
tests = sum(int(s.get("tests", 0)) for s in root)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in root)
skipped = sum(int(s.get("skipped", 0)) for s in root)
print(f"== junit: {tests} tests, {bad} failed or errored, {skipped} skipped -> {sys.argv[2]}")
EOF
    python3 - "$OUT" <<'EOF'
import json, os, sys
def fmt(x):
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)
p = os.path.join(sys.argv[1], "one_gpu_cells.json")
if os.path.exists(p):
    d = json.load(open(p))
    bad = [c for c in d["cells"] if not c.get("pass")]
    print(f"== one-GPU cells: {len(d['cells'])}, {len(bad)} not passing, matrix {d['wall_s']} s "
          "(vs 1 rank | vs stock: px max/mean in 1/255, latent rel)")
    for c in d["cells"]:
        one, st = (c.get("comparisons", {}).get(k, {}) for k in ("1rank", "stock"))
        tag = "ok  " if c.get("pass") else ("info" if c.get("informational") else "BAD ")
        print(f"  {tag} {c['id']:26s} {fmt(c.get('wall_s')):>5}s | {fmt(one.get('px_max'))}/{fmt(one.get('px_mean'))} "
              f"{fmt(one.get('latent_rel'))} | {fmt(st.get('px_max'))}/{fmt(st.get('px_mean'))} {fmt(st.get('latent_rel'))}"
              + ("" if c.get("ran") else "  (did not run)"))
p = os.path.join(sys.argv[1], "usp_one_gpu.json")
if os.path.exists(p):
    d = json.load(open(p))
    for world, rows in d["worlds"].items():
        if isinstance(rows, dict):
            print(f"== usp world {world}: JOB FAILED")
            continue
        worst = {}
        for r in rows:
            worst[r["kind"]] = max(worst.get(r["kind"], 0.0), r.get("fp8_vs_raw") or r.get("err") or 0.0)
        nbad = sum(bool(r["failures"]) for r in rows)
        print(f"== usp world {world}: {len(rows)} cases, {nbad} failing; worst " +
              ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst.items())))
EOF
    echo "== done in $(($(date +%s) - T0)) s, status $status; files in $OUT:"
    ls -la "$OUT"
    return $status
}

main 2>&1 | tee "$OUT/suite.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
