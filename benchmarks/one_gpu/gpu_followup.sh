#!/usr/bin/env bash
# Second call on a lent H200 after gpu_suite.sh (<= 9 minutes, `.whl` carried): re-runs what the first
# call found broken (compiled usp on 2-4 ranks, CUDA-graph ops, the INT8 Triton byte check), the example
# cells it lacked (SD3 CFG/PipeFusion, PixArt PipeFusion x Ulysses), and adds: the INT8 codec benchmark,
# the kernel-layout probe (benchmarks/one_gpu/layout_probe.py) and one step of the FLUX.1-dev-size
# transformer through xfuser at ulysses 2, 2 ranks on the GPU over gloo (stock vs the 8-bit variants).
#
#   bash benchmarks/one_gpu/gpu_followup.sh     # everything to $OUT (followup.log + JSON files)
set -o pipefail
cd "$(dirname "$0")/../.." || exit 2
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT/cells"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false FASTUSP_XDIT_AUTOLOAD=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T=$(mktemp -d)
py() { local name=$1 t=$2; shift 2; timeout -k 10 "$t" python3 -m pytest -q -rfEs -p no:cacheprovider --timeout $((t - 5)) "$@" >"$T/$name.log" 2>&1; echo "== $name: exit $?" >>"$T/$name.log"; }
{
  echo "== followup $(date -u +%FT%TZ) on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
  FASTUSP_RESULTS_DIR=$OUT py usp_compiled 240 tests/test_usp_one_gpu_cuda.py -k compiled &
  py ops_cuda 200 tests/test_ops_cuda.py &
  py int8_cuda 200 tests/test_int8_codec.py -k cuda &
  FASTUSP_RESULTS_DIR=$OUT/cells FASTUSP_ONE_GPU_ONLY='sd3-(cfg2u2|pf2)|pixart-pf2u2' py cells 300 tests/xdit/test_one_gpu_cuda.py &
  (OUT=$OUT timeout -k 10 330 python3 benchmarks/step.py --world 2 --one-gpu --iters 1 --warmup 0 \
      --variants stock:eager,fastusp:eager,fastusp_fp8:eager,fastusp_int8:eager >"$T/step.log" 2>&1; echo "== step: exit $?" >>"$T/step.log") &
  wait
  for f in usp_compiled ops_cuda int8_cuda cells step; do cat "$T/$f.log" | grep -v "^DEBUG\|torch.__trace" | tail -60; done
  echo "== int8 codec benchmark (alone)"; OUT=$OUT timeout -k 5 150 python3 benchmarks/int8_codec.py; echo "== int8_codec: exit $?"
  echo "== layout probe"; OUT=$OUT timeout -k 5 60 python3 benchmarks/one_gpu/layout_probe.py; echo "== layout_probe: exit $?"
  ls -la "$OUT" "$OUT/cells"
} 2>&1 | tee "$OUT/followup.log"
