#!/usr/bin/env bash
# The GPU lease of issue #27, as two calls of the device tool on one warm machine (docs/gpu_lease.md says how to run
# them, what comes back and what to commit):
#
#   bash benchmarks/gpu/gpu_session.sh call1     # env tests tune pack              (run timeout_s=330)
#   bash benchmarks/gpu/gpu_session.sh call2     # env hopper sweep w2v decode pack (run timeout_s=330)
#   bash benchmarks/gpu/gpu_session.sh PHASE...  # phases by name: env tests tune hopper sweep w2v decode pack
#   bash benchmarks/gpu/gpu_session.sh prepare   # CPU machine, before the lease: gensim's corpus into build/lease/
#   DRY_RUN=1 bash benchmarks/gpu/gpu_session.sh call1   # the rehearsal on a CPU: every phase's own code path,
#                                                        # tiny shapes, Triton's interpreter (minutes)
#
# Phases (each bounded by its own timeout: SIGINT at its share, SIGKILL a few seconds later, so a slow phase never
# eats the next one; a phase starts only with its minimum left after reserving the minimums of the phases after it):
#   env     nvidia-smi, pip install -e . offline (gpu_install.sh), the device's report tag and config-table key
#   tests   the whole CUDA test suite under its cap, most telling files first; every outcome logged as it happens
#           (lease_pytest.py), so a stopped run still says what passed and failed: tests_cuda.log, failures first
#   tune    python -m benchmarks.tune --dtype bf16 --suite embedding,attention: the keys the device's table lacks,
#           into the session's configs/ (kept across the two calls: a rerun tunes only what is still missing)
#   hopper  benchmarks/gpu/hopper_attention.py on the tuned table: sm90 variants vs SDPA cuDNN/flash, correctness,
#           D512/MLA rows where the installed embedattn takes them, the defaults rule -> impl_defaults.json, merged
#           into the tuned table (entries attention.impl_fwd / attention.impl_bwd)
#   sweep   python -m benchmarks --suite embedding,attention --dtype bf16 on the tuned table (embedding first)
#   w2v     benchmarks/gpu/w2v_bench.py: words/s on ~100M words, WordSim-353 against gensim's reference
#   decode  benchmarks/scripts/decode_bench.py: paged (64/16/256) vs contiguous vs SDPA; MLA 576/512 if supported
#   pack    results.csv (sweep + word2vec rows), summary.md, NOTES.md (the targets table from the numbers),
#           tests_cuda.log; plots when the call has the time (collect draws them again on the CPU machine)
# After every phase the call publishes $OUT/<gpu>/ (at most 8 files, the tool's limit): session.json, NOTES.md,
# tests_cuda.log, hopper_attention.md, summary.md, <device key>.json and lease-call<N>.tgz (everything, in the
# layout benchmarks/gpu/lease_report.py collect places into the repository).
#
# Budget (seconds). The call's budget CALL_S (default 315) is the run's timeout_s (330) less 15 s for the tool's
# own stop and the copy of $OUT. Caps (env PHASE_S overrides, e.g. TESTS_S=120) and minimums:
#   call1: env 30 (min 10) + tests 150 (40) + tune 115 (40) + pack 15 (10)                        = 310 <= 315
#   call2: env ~5 of 30 on the warm machine + hopper 115 (60) + sweep 100 (40) + w2v 45 (20) + decode 30 (15)
#          + pack 15 (10) = 310 <= 315 (on a fresh machine env takes ~20 s: decode and pack get what is left)
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET EMBEDATTN_BACKEND
ROOT=$PWD

DRY=${DRY_RUN:-0}
PY=${PY:-python3}
if [ "$DRY" = 1 ]; then
    BASE=${SESSION_DIR:-/tmp/embedattn_lease_dry}
    OUT_DIR=${OUT:-$BASE/out}  # call<N>/ below it, emptied first: what the device tool's $OUT is to each call
    CALL_S=${CALL_S:-1500}
else
    BASE=${SESSION_DIR:-/tmp/embedattn_lease}
    OUT_DIR=${OUT:-$ROOT/gpu_out}
    CALL_S=${CALL_S:-315}
fi
W=$BASE/work
declare -A CAP=([env]=${ENV_S:-30} [tests]=${TESTS_S:-150} [tune]=${TUNE_S:-115} [hopper]=${HOPPER_S:-115}
                [sweep]=${SWEEP_S:-100} [w2v]=${W2V_S:-45} [decode]=${DECODE_S:-30} [pack]=${PACK_S:-15})
declare -A MIN=([env]=10 [tests]=40 [tune]=40 [hopper]=60 [sweep]=40 [w2v]=20 [decode]=15 [pack]=10)
if [ "$DRY" = 1 ]; then  # the interpreter is slow: the rehearsal's own caps
    CAP=([env]=60 [tests]=240 [tune]=150 [hopper]=300 [sweep]=150 [w2v]=150 [decode]=120 [pack]=90)
fi

CALL=${CALL:-x}
case "${1:-}" in
    call1) CALL=1; PHASES=(env tests tune pack) ;;
    call2) CALL=2; PHASES=(env hopper sweep w2v decode pack) ;;
    prepare) PHASES=(prepare) ;;
    "") echo "usage: $0 call1|call2|prepare|PHASE... (phases: ${!CAP[*]})" >&2; exit 2 ;;
    *) PHASES=("$@") ;;
esac
if [ "$DRY" = 1 ] && [ -z "${OUT:-}" ]; then
    OUT_DIR=$OUT_DIR/call$CALL
    rm -rf "$OUT_DIR"
fi
for p in "${PHASES[@]}"; do
    [ "$p" = prepare ] || [ -n "${CAP[$p]+x}" ] || { echo "gpu_session: unknown phase '$p'" >&2; exit 2; }
done

if [ "${PHASES[0]}" = prepare ]; then  # CPU machine: the corpus the w2v phase reads (gensim is not on the GPU one)
    mkdir -p build/lease/data
    "$PY" - <<'EOF' || exit 1
import shutil
from benchmarks.negative_sampling import gensim_data
for name in ("head500.noblanks.cor", "wordsim353.tsv"):
    src = gensim_data(name)
    if src is None:
        raise SystemExit(f"prepare: gensim's {name} not found (pip install gensim)")
    shutil.copy(src, "build/lease/data/")
    print("build/lease/data <-", src)
EOF
    du -sh build/lease/data
    exit 0
fi

mkdir -p "$W/logs" "$W/configs" "$OUT_DIR"
T0=$(date +%s)
DEADLINE=$((T0 + CALL_S))
now() { date +%s; }
elapsed() { echo $(($(now) - T0)); }
[ -d build/lease/data ] && export EMBEDATTN_BENCH_DATA="$ROOT/build/lease/data"

identify() {  # the report folder's tag, the config table's key and the device's name, once per session
    if [ ! -s "$W/ids" ]; then
        if [ "$DRY" = 1 ]; then
            echo "dryrun cpu cpu" > "$W/ids"
        else
            "$PY" - > "$W/ids" 2>>"$W/logs/env.log" <<'EOF' || echo "gpu gpu unknown" > "$W/ids"
import torch
from benchmarks.harness import device_tag
from embedattn.configs import device_key
print(device_tag("cuda"), device_key("cuda"), torch.cuda.get_device_name().replace(" ", "_"))
EOF
        fi
    fi
    read -r TAG DEVKEY GPU_NAME < "$W/ids"
    R="$W/reports/$TAG"
    mkdir -p "$R"
}

# ------------------------------------------------------------------------------------------------------ phases
# the session's tuned table over the shipped one, no autotuning (a key it lacks runs its heuristic config: autotuning
# would not fit the phase)
TUNED=(env EMBEDATTN_CONFIGS_DIR="$W/configs" EMBEDATTN_AUTOTUNE=0)
DRY_ARG=()  # the scripts' own rehearsal switch
[ "$DRY" = 1 ] && DRY_ARG=(--dry-run)

capped() {  # capped A KILL LOG COMMAND...: COMMAND within the phase's share A (SIGINT KILL s before its end, SIGKILL
            # KILL s later), its output in logs/LOG.log; returns its status (124: the cap stopped it)
    local a=$1 kill=$2 log=$3
    shift 3
    timeout -s INT -k "$kill" $((a - kill)) "$@" > "$W/logs/$log.log" 2>&1
}

phase_env() {
    local a=$1
    { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,memory.used \
        --format=csv,noheader 2>&1 || echo "no nvidia-smi"; } | tee "$W/logs/nvidia_smi.log"
    env PY="$PY" PYTHONPATH_FILE="$W/pythonpath" timeout -k 5 $((a - 8)) bash benchmarks/gpu/gpu_install.sh \
        > "$W/logs/install.log" 2>&1
    local rc=$?
    tail -n 3 "$W/logs/install.log"
    if [ -s "$W/pythonpath" ] && [[ ":${PYTHONPATH:-}:" != *":$(cat "$W/pythonpath"):"* ]]; then
        PYTHONPATH="$(cat "$W/pythonpath")${PYTHONPATH:+:$PYTHONPATH}"
        export PYTHONPATH
    fi
    rm -f "$W/ids"
    identify
    "$PY" - <<'EOF' 2>&1 | tee -a "$W/logs/env.log"
import embedattn, torch, triton
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "triton", triton.__version__, "embedattn", embedattn.__file__)
print("cuda", torch.version.cuda, torch.cuda.get_device_name() if cuda else "none",
      torch.cuda.get_device_capability() if cuda else "")
EOF
    echo "tag $TAG, config table $DEVKEY.json, device $GPU_NAME"
    return $rc
}
# PYTHONPATH written by a fallback install holds for every later phase and call
if [ -s "$W/pythonpath" ]; then
    PYTHONPATH="$(cat "$W/pythonpath")${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONPATH
fi

TEST_ORDER=(tests/attention/test_hopper.py tests/attention/test_attention.py tests/embedding
            tests/word2vec/test_word2vec.py tests/negative_sampling tests/attention/test_paged_kv.py
            tests/attention/test_attention_features.py tests/rotary tests/attention/test_philox.py tests/integrations
            tests/distributed tests/test_fuzz.py tests/benchmarks tests/word2vec tests/test_packaging.py)
test_files() {  # the priority list, then every test file it does not name (the whole suite, in a useful order)
    local f p named
    for p in "${TEST_ORDER[@]}"; do [ -e "$p" ] && echo "$p"; done
    for f in $(find tests -name 'test_*.py' | sort); do
        named=0
        for p in "${TEST_ORDER[@]}"; do [[ $f == "$p" || $f == "$p"/* ]] && named=1; done
        [ $named = 0 ] && echo "$f"
    done
}

phase_tests() {
    local a=$1 extra=() dev=cuda workers
    workers=$(nproc)
    rm -f "$W"/tests_results.tsv "$W"/tests_failures.txt "$W"/tests_pytest.log
    "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 120)  # a hung case must not hold a worker
    "$PY" -c "import xdist" 2>/dev/null || workers=0
    if [ "$DRY" = 1 ]; then dev=cpu; workers=2; extra+=(--lease-per-file 1); fi
    [ "$workers" -gt 0 ] && extra+=(-n "$workers")
    mapfile -t files < <(test_files)
    env EMBEDATTN_TEST_DEVICE=$dev PYTHONPATH="$ROOT/benchmarks/gpu${PYTHONPATH:+:$PYTHONPATH}" \
        timeout -s INT -k 10 $((a - 15)) "$PY" -m pytest "${files[@]}" -p lease_pytest -p no:cacheprovider \
        --lease-log "$W/tests_results.tsv" --lease-failures "$W/tests_failures.txt" -rfE --durations=15 \
        "${extra[@]}" > "$W/tests_pytest.log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "tests: stopped by the phase's cap ($((a - 15)) s) before the suite finished" \
        | tee -a "$W/tests_pytest.log"
    "$PY" benchmarks/gpu/lease_report.py tests "$W" "$R/tests_cuda.log"
    grep -E "^(FAILED|ERROR) " "$R/tests_cuda.log" | head -n 20
    return $rc
}

phase_tune() {
    local a=$1 args=(--device cuda --dtype bf16)
    [ "$DRY" = 1 ] && args=(--device cpu --tiny --compile-workers 0)
    capped "$a" 10 tune "$PY" -m benchmarks.tune "${args[@]}" --suite embedding,attention --max-seconds $((a - 20)) \
        --out "$W/configs"
    local rc=$?
    grep -E "^(tuning|tuned|skipped|failed)" "$W/logs/tune.log" | cut -c1-300
    return $rc
}

phase_hopper() {
    local a=$1
    capped "$a" 8 hopper "${TUNED[@]}" "$PY" benchmarks/gpu/hopper_attention.py --out "$R" --max-seconds $((a - 15)) \
        --merge-into "$W/configs/$DEVKEY.json" "${DRY_ARG[@]}"
    local rc=$?
    grep -E "^(  probe|  capability|compile pool|ceilings|done in)|BAD" "$W/logs/hopper.log" | cut -c1-200
    sed -n '/^## Defaults decided/,/^| lever/p' "$R/hopper_attention.md" 2>/dev/null | head -n 30
    return $rc
}

phase_sweep() {
    local a=$1 args=(--device cuda --dtype bf16)
    [ "$DRY" = 1 ] && args=(--device cpu --tiny)
    "${TUNED[@]}" timeout -s INT -k 10 $((a - 10)) \
        "$PY" -m benchmarks "${args[@]}" --suite embedding,attention --max-seconds $((a - 35)) --no-compile \
        --warmup-ms 5 --rep-ms 30 \
        --no-plots --out "$W/sweep" 2>&1 | tr '\r' '\n' | grep -vE '(pt/s|s/pt)]$' > "$W/logs/sweep.log"
    local rc=${PIPESTATUS[0]}
    tail -n 4 "$W/logs/sweep.log" | cut -c1-200
    return "$rc"
}

phase_w2v() {
    local a=$1 interp=()
    [ "$DRY" = 1 ] && interp=(TRITON_INTERPRET=1)
    capped "$a" 5 w2v env "${interp[@]}" "$PY" benchmarks/gpu/w2v_bench.py --out "$R/w2v.csv" \
        --max-seconds $((a - 12)) "${DRY_ARG[@]}"
    local rc=$?
    sed -n '/^w2v_bench: done/,$p' "$W/logs/w2v.log" | cut -c1-200
    return $rc
}

phase_decode() {
    local a=$1
    capped "$a" 5 decode "${TUNED[@]}" "$PY" benchmarks/scripts/decode_bench.py --out "$R/decode.csv" \
        --max-seconds $((a - 15)) "${DRY_ARG[@]}"
    local rc=$?
    grep -E "^(MLA|decode_bench)" "$W/logs/decode.log"
    return $rc
}

phase_pack() {
    local a=$1 end
    end=$(($(now) + a - 3))
    [ -s "$W/sweep/env.json" ] && cp "$W/sweep/env.json" "$R/env.json"
    "$PY" benchmarks/gpu/lease_report.py merge-csv "$R/results.csv" "$W/sweep/results.csv" "$R/w2v.csv"
    [ -s "$R/results.csv" ] && timeout 20 "$PY" -m benchmarks.summary "$R/results.csv" > /dev/null
    [ -s "$W/tests_results.tsv" ] && "$PY" benchmarks/gpu/lease_report.py tests "$W" "$R/tests_cuda.log" > /dev/null
    rm -f "$R/NOTES.md"
    session_json
    "$PY" benchmarks/gpu/lease_report.py targets "$R" > /dev/null
    sed -n '/^| target/,/^### Missed/p' "$R/NOTES.md" | head -n 20 | cut -c1-260
    if [ $((end - $(now))) -gt 8 ] && [ -s "$R/results.csv" ]; then  # plots if time is left (collect redraws)
        timeout $((end - $(now))) "$PY" -m benchmarks.plot "$R/results.csv" > "$W/logs/plots.log" 2>&1 \
            || echo "pack: plots left for collect (the CPU machine draws them from the CSV)"
    fi
}

# ------------------------------------------------------------------------------------------------------ publish
session_json() {
    "$PY" - "$W" "$R/session.json" "$CALL_S" "$TAG" "$DEVKEY" "$GPU_NAME" "$CALL" "$(elapsed)" "$DRY" <<'EOF'
import json, os, re, sys
w, out, call_s, tag, devkey, gpu, call, wall, dry = sys.argv[1:10]
phases = []
for line in open(f"{w}/phases.tsv") if os.path.exists(f"{w}/phases.tsv") else []:
    c, p, allowed, used, rc, note = (line.rstrip("\n").split("\t") + [""])[:6]
    phases.append({"call": c, "phase": p, "allowed_s": int(allowed), "seconds": int(used), "rc": int(rc), "note": note})
def last(path, pattern):
    try:
        hits = [ln.strip() for ln in open(path, errors="replace") if re.search(pattern, ln)]
    except OSError:
        return None
    return hits[-1] if hits else None
info = {"gpu": gpu.replace("_", " "), "tag": tag, "device_key": devkey, "dry_run": dry == "1",
        "call": call, "call_budget_s": int(call_s), "call_clock_s": int(wall), "phases": phases,
        "tests": last(f"{w}/reports/{tag}/tests_cuda.log", r"^counts: "),
        "tune": last(f"{w}/logs/tune.log", r"^tuned \d+ keys"), "sweep": last(f"{w}/logs/sweep.log", r"^done in|budget"),
        "hopper": last(f"{w}/logs/hopper.log", r"^done in"), "w2v": last(f"{w}/logs/w2v.log", r"^w2v_bench: done"),
        "decode": last(f"{w}/logs/decode.log", r"^decode_bench: \d+ of")}
json.dump(info, open(out, "w"), indent=1)
EOF
}

publish() {  # this call's files -> $OUT_DIR/$TAG (<= 8 files); after every phase, so a stopped call still returns
    local dest="$OUT_DIR/${TAG:-gpu}" f tgz
    mkdir -p "$dest"
    session_json
    for f in session.json NOTES.md tests_cuda.log hopper_attention.md summary.md; do
        [ -s "$R/$f" ] && cp "$R/$f" "$dest/"
    done
    [ -s "$W/configs/$DEVKEY.json" ] && cp "$W/configs/$DEVKEY.json" "$dest/"
    tgz="$dest/lease-call$CALL.tgz"
    cp "$W"/tests_*.* "$W/logs/" 2>/dev/null
    tar czf "$tgz.tmp" -C "$W" reports configs logs 2>/dev/null && mv "$tgz.tmp" "$tgz"
}

record() {  # phase, allowed seconds, seconds used, exit status, note
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$CALL" "$1" "$2" "$3" "$4" "${5:-}" >> "$W/phases.tsv"
    echo "== $1: rc=$4 in $3 s (allowed $2 s; call at $(elapsed) s of $CALL_S)${5:+: $5}"
}

allow() {  # seconds phase $1 (at index $2) may take: its cap, less what the later phases' minimums need
    local i=$2 after=0 j left
    for ((j = i + 1; j < ${#PHASES[@]}; j++)); do after=$((after + MIN[${PHASES[$j]}])); done
    left=$((DEADLINE - $(now) - after))
    echo $((left < CAP[$1] ? left : CAP[$1]))
}

TAG=gpu DEVKEY=gpu GPU_NAME=unknown R="$W/reports/gpu"
[ "${PHASES[0]}" = env ] || identify
trap publish EXIT
if [ "$DRY" = 1 ] && [ "$CALL" = 1 ]; then  # a rehearsal starts from nothing, as a fresh machine does
    rm -rf "$W" && mkdir -p "$W/logs" "$W/configs"
fi
echo "== gpu_session call $CALL: ${PHASES[*]} (budget $CALL_S s$([ "$DRY" = 1 ] && echo ", DRY_RUN")) -> $OUT_DIR"
for i in "${!PHASES[@]}"; do
    p=${PHASES[$i]}
    a=$(allow "$p" "$i")
    if [ "$a" -lt "${MIN[$p]}" ]; then
        record "$p" "$a" 0 3 "skipped: the call has no time left for it"
        [ "$p" = env ] && identify
        continue
    fi
    start=$(now)
    echo "== $p (allowed $a s; call at $(elapsed) s)"
    "phase_$p" "$a"
    rc=$?
    record "$p" "$a" $(($(now) - start)) $rc
    publish
done
printf '\n%-5s %-7s %8s %8s %4s\n' call phase allowed used rc
awk -F'\t' '{printf "%-5s %-7s %8s %8s %4s %s\n", $1, $2, $3, $4, $5, $6}' "$W/phases.tsv"
echo "== $OUT_DIR/$TAG:" "$OUT_DIR/$TAG"/*
