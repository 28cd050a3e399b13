#!/usr/bin/env bash
# One GPU benchmark pass for a lent, offline CUDA machine (torch + triton + matplotlib preinstalled).
#
#   bash benchmarks/gpu/gpu_check.sh [OUT_DIR] [BUDGET_SECONDS] [extra python -m benchmarks args...]
#
# OUT_DIR defaults to $OUT (the device tool's return folder) or ./gpu_out; BUDGET_SECONDS (default
# 240) bounds the sweeps: points left when it runs out are skipped and listed in summary.md. Env:
# EMBEDATTN_BENCH_DATA (folder with head500.noblanks.cor[.bz2] and wordsim353.tsv when gensim is absent),
# GPU_CHECK_SUITES (default all), GPU_CHECK_PYTHON (default python3), GPU_CHECK_DEVICE (default cuda;
# cpu only to dry-run this script), GPU_CHECK_SKIP_INSTALL=1 (embedattn already installed),
# GPU_CHECK_TUNE_S (default 0: none): first tune, for that many seconds, the keys this device's config table lacks
# (python -m benchmarks.tune, into OUT_DIR/configs/, which the sweep then reads through EMBEDATTN_CONFIGS_DIR;
# copy the table it writes to embedattn/configs/ to ship it). benchmarks/gpu/gpu_session.sh is the full
# session (the CUDA test suite, tuning, the sweep) on a lent H200. Results land in
# OUT_DIR/reports/<device-tag>/ (results.csv, env.json, plots/, summary.md): copy that folder to the
# repository's reports/. Autotune results persist in Triton's cache (TRITON_CACHE_AUTOTUNING=1), so a
# second pass on the same machine does not retune; those decisions are also saved to
# OUT_DIR/triton_autotune_cache.tgz.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

OUT_DIR="${1:-${OUT:-gpu_out}}"
BUDGET="${2:-240}"
shift $(( $# > 2 ? 2 : $# ))
PY="${GPU_CHECK_PYTHON:-python3}"
SUITES="${GPU_CHECK_SUITES:-all}"
DEV="${GPU_CHECK_DEVICE:-cuda}"
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
export TRITON_CACHE_AUTOTUNING=1
unset TRITON_INTERPRET EMBEDATTN_BACKEND
t0=$(date +%s)

# 1. install (no network: no deps, no build isolation); fall back to a source-tree import
if [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
    :
elif ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT_DIR/pip.log" 2>&1; then
    echo "pip install -e . failed (see pip.log): importing from the source tree"
    ln -sfn ../kernels embedattn/kernels   # the package maps embedattn.kernels to kernels/
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - "$DEV" <<'EOF' || { echo "gpu_check: no usable $DEV device"; exit 2; }
import sys, torch, triton, embedattn
dev = torch.device(sys.argv[1])
assert dev.type == "cpu" or torch.cuda.is_available(), "CUDA not available"
name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
print(f"torch {torch.__version__}, triton {triton.__version__}, {name}")
EOF

# 2. device peaks first (seconds): a sanity check even if the sweep fails
"$PY" - "$OUT_DIR" "$DEV" <<'EOF'
import json, sys, torch
from benchmarks import harness
ctx = harness.Context(device=torch.device(sys.argv[2]), profile="quick", warmup_ms=10, rep_ms=50)
peaks = {"device": torch.cuda.get_device_name() if ctx.is_cuda else "cpu",
         "copy_gbps": harness.measure_copy_bandwidth(ctx),
         "matmul_bf16_tflops": harness.measure_matmul_peak(ctx, torch.bfloat16),
         "matmul_fp16_tflops": harness.measure_matmul_peak(ctx, torch.float16)}
print(json.dumps(peaks))
json.dump(peaks, open(f"{sys.argv[1]}/peaks.json", "w"), indent=2)
EOF

# 3. optional: tune what this device's config table lacks; the sweep reads the result
TUNE_S="${GPU_CHECK_TUNE_S:-0}"
if [ "$TUNE_S" -gt 0 ] && [ "$DEV" = cuda ]; then
    timeout --signal=INT $(( TUNE_S + 60 )) "$PY" -m benchmarks.tune --device cuda --max-seconds "$TUNE_S" \
        --out "$OUT_DIR/configs" > "$OUT_DIR/tune.log" 2>&1
    grep -E "^(tuning|tuned|skipped|failed)" "$OUT_DIR/tune.log" | cut -c1-300
    export EMBEDATTN_CONFIGS_DIR="$OUT_DIR/configs${EMBEDATTN_CONFIGS_DIR:+:$EMBEDATTN_CONFIGS_DIR}"
fi

# 4. the full sweep under the budget (hard stop at budget + 150 s for the point in flight and plots)
TAG=$("$PY" -c "from benchmarks.harness import device_tag; print(device_tag('$DEV'))")
DEST="$OUT_DIR/reports/$TAG"
timeout --signal=INT $(( BUDGET + 150 )) "$PY" -m benchmarks --device "$DEV" --suite "$SUITES" \
    --max-seconds "$BUDGET" --out "$DEST" "$@" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | grep -v 'pt/s]$' \
    > "$OUT_DIR/sweep.log"
rc=${PIPESTATUS[0]}
tail -n 40 "$OUT_DIR/sweep.log"

# 5. whatever the sweep left: plots and summary re-drawn from the CSV (it is written point by point)
if [ "$rc" -ne 0 ] && [ -s "$DEST/results.csv" ]; then
    echo "sweep exited with $rc: re-drawing plots/summary from the partial CSV"
    "$PY" -m benchmarks.plot "$DEST/results.csv" && "$PY" -m benchmarks.summary "$DEST/results.csv" >/dev/null
fi
CACHE="${TRITON_CACHE_DIR:-$HOME/.triton/cache}"  # only the autotune decisions, not the compiled binaries
(cd "$CACHE" 2>/dev/null && find . -name '*.autotune.json' | tar czf "$OUT_DIR/triton_autotune_cache.tgz" -T -) \
    2>/dev/null || true
echo "gpu_check: rc=$rc in $(( $(date +%s) - t0 )) s -> $DEST"
ls "$DEST" 2>/dev/null
exit "$rc"
