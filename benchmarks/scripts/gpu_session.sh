# one device call: CUDA tests of the Triton paths (bounded), then the benchmark sweep (bounded)
export PYTHONUNBUFFERED=1
t0=$(date +%s)
. benchmarks/scripts/gpu_install.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv
# 1. tests on CUDA, Triton paths first (reference-backend cases are device-independent)
EMBEDATTN_TEST_DEVICE=cuda timeout -s INT ${TEST_S:-120} pytest -n 16 -v -p no:cacheprovider -k "not reference" \
  tests/test_attention.py tests/test_attention_features.py tests/test_embedding.py tests/test_negative_sampling.py \
  tests/test_integrations.py tests/test_word2vec.py > $OUT/tests_cuda.log 2>&1
echo "tests rc=$? after $(( $(date +%s) - t0 )) s"
grep -c " PASSED" $OUT/tests_cuda.log; grep -E " FAILED| ERROR" $OUT/tests_cuda.log | sed 's/^\[gw[0-9]*\] *//' | head -30
tail -3 $OUT/tests_cuda.log
# 2. the sweep (fixed heuristic configs: autotuning every key would not fit the lease)
export EMBEDATTN_AUTOTUNE=${AUTOTUNE:-0} EMBEDATTN_BENCH_DATA=${EMBEDATTN_BENCH_DATA:-$PWD/.dev/data} TRITON_CACHE_AUTOTUNING=1
mkdir -p /tmp/gout/h100
timeout -s INT ${SWEEP_HARD_S:-200} python3 -m benchmarks --device cuda --suite all --max-seconds ${SWEEP_S:-160} \
  --no-compile --no-plots --dtype bf16 --out /tmp/gout/h100 2>&1 | tr '\r' '\n' | grep -v 'pt/s]$' > $OUT/sweep.log
echo "sweep rc=$? after $(( $(date +%s) - t0 )) s"; tail -30 $OUT/sweep.log
tar czf $OUT/reports.tgz -C /tmp/gout h100 2>/dev/null; ls -la $OUT /tmp/gout/h100
