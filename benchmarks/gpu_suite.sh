#!/usr/bin/env bash
# The whole GPU verification in one command, each part under 10 minutes on one H100.
#
#   bash benchmarks/gpu_suite.sh [check|tests|bench|extra|sdxl|controlnet|all] OUTDIR
#
#   check  bring what fastsd needs (below) and say what is missing; nothing else
#   tests  the GPU-marked tests, then fp16 vs fp32 per network (contiguous and channels-last
#          where eager runs channels-last) on the tests' tiny architecture and synthetic SD 1.5
#   bench  fastsd bench, synthetic SD 1.5, 512x512, 50 DDIM steps, CFG 7.5, batch 1:
#          diffusers fp16 (its defaults), eager, eager + whole-step graphs, compiled
#          (AOTInductor, built inside the run, its build time reported); BENCH_BACKENDS overrides the list
#   extra  for the two fastest fastsd rows of `bench`: 1 step without CFG at 512x512,
#          and 50 steps at 1024x1024 (compiled rebuilt static at 1024 first)
#   sdxl   fastsd bench, synthetic SD-XL (built first), 1024x1024, 30 Euler steps, CFG 5.0, fp16:
#          diffusers' StableDiffusionXLPipeline, eager, eager + whole-step graphs, compiled (built
#          inside the run; SDXL_BACKENDS overrides the list), with each row's peak device memory
#   controlnet  fastsd bench, synthetic SD 1.5 + synthetic ControlNet, 512x512, 50 DDIM steps, CFG 7.5,
#          fp16: diffusers' StableDiffusionControlNetPipeline, eager, eager + whole-step graphs,
#          compiled (UNet with residual inputs and the ControlNet, built inside the run)
#   all    tests, bench and extra in turn (about 3 x 10 minutes; sdxl and controlnet are run on their own)
#
# Runs where torch with CUDA imports (PYTHON, default python3); the repository goes on
# PYTHONPATH. What fastsd needs beyond the machine's own packages it brings first: wheels
# carried in the repository's .whl/ (../shared/tools/gpu-wheels.sh fills it; carried to a GPU
# machine with the working tree), installed with --no-index into FASTSD_SUITE_SITE (default
# /tmp/fastsd-suite-site), else from the package registries where the machine reaches them.
# One line says what it could not get and what that skips; without diffusers (fastsd's model
# classes) it stops there (exit 2). Everything goes under OUTDIR: JSON, Markdown, logs, and
# summary.md.
set -uo pipefail

PART=all
if [ $# -eq 2 ]; then PART=$1; OUT=$2
elif [ $# -eq 1 ]; then OUT=$1
else echo "usage: gpu_suite.sh [check|tests|bench|extra|sdxl|controlnet|all] OUTDIR" >&2; exit 2; fi
case "$PART" in check|tests|bench|extra|sdxl|controlnet|all) ;; *) echo "gpu_suite: unknown part '$PART' (check, tests, bench, extra, sdxl, controlnet or all)" >&2; exit 2;; esac

PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE" || exit 2
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_suite: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/suite.log"
MODEL=${FASTSD_SUITE_MODEL:-synthetic:sd15}
ENGINES="$OUT/engines"
status=0

say() { echo "[gpu_suite $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

join() { local first=$1; shift; printf '%s' "$first" "${@/#/, }"; }

missing() {  # the modules of "$@" that do not import
    "$PY" -c 'import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@" 2>>"$LOG"
}

bring() {  # what fastsd needs that the machine lacks: carried wheels, else the registries
    local site=${FASTSD_SUITE_SITE:-/tmp/fastsd-suite-site} need
    if compgen -G "$HERE/.whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$HERE"/.whl/*.whl \
            >>"$LOG" 2>&1 || echo "gpu_suite: installing the wheels in .whl/ failed" >>"$LOG"
    fi
    [ -d "$site" ] && export PYTHONPATH="$site:$PYTHONPATH"
    need=$(missing diffusers onnxslim)
    if [ -n "$need" ]; then  # an offline machine fails this quickly
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-deps --timeout 10 --retries 0 --target "$site" $need >>"$LOG" 2>&1 \
            && export PYTHONPATH="$site:$PYTHONPATH"
    fi
    need=" $(missing diffusers onnxslim tensorrt) "
    if [[ "$need" == *" diffusers "* ]]; then
        echo "gpu_suite: cannot get diffusers (fastsd's model classes); carry the wheels of ../shared/tools/gpu-wheels.sh in .whl/" >&2
        exit 2
    fi
    local lacks=() skips=()
    [[ "$need" == *" onnxslim "* ]] && { lacks+=(onnxslim); skips+=("ONNX export tests"); }
    [[ "$need" == *" tensorrt "* ]] && { lacks+=(tensorrt); skips+=("TensorRT tests and rows"); }
    if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
            2>/dev/null; then
        lacks+=(onnxruntime-gpu); skips+=("ONNX Runtime on CUDA")
    fi
    if [ ${#lacks[@]} -gt 0 ]; then
        say "could not get: $(join "${lacks[@]}") (skipped: $(join "${skips[@]}"))"
    else
        say "every optional package is here (onnxslim, tensorrt, onnxruntime-gpu)"
    fi
}

run_tests() {
    say "machine"; "$PY" -m fastsd info 2>&1 | tee "$OUT/info.txt" >>"$LOG"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv \
        >"$OUT/nvidia-smi.csv" 2>&1 || true
    say "GPU-marked tests"
    "$PY" -m pytest -q -p no:cacheprovider -o addopts= -m gpu -rs tests --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/tests.log" | tee -a "$LOG"
    [ $rc -eq 0 ] || { say "GPU tests FAILED (rc $rc): see tests.log"; status=1; }
    precision precision-tiny synthetic:tiny  # seconds: the tests' architecture, where the fp16 tests run
    precision precision "$MODEL"
}

precision() {  # precision NAME MODEL: fp16 vs fp32 per network, each layout eager runs on CUDA
    say "fp16 vs fp32 per network ($2)"
    "$PY" benchmarks/precision.py --model "$2" --device cuda --dtype fp16 --out "$OUT/$1" >"$OUT/$1.log" 2>&1
    local rc=$?
    cat "$OUT/$1/precision.md" 2>/dev/null | tee -a "$LOG"
    [ $rc -eq 0 ] || { say "precision check $2 FAILED (rc $rc): see $1.log"; status=1; }
}

bench() {  # bench NAME ARGS...
    local name=$1; shift
    say "bench $name: fastsd bench $*"
    "$PY" -m fastsd bench --model "$MODEL" --engine-dir "$ENGINES" --out "$OUT/$name" "$@" \
        >"$OUT/$name.log" 2>&1
    local rc=$?
    cat "$OUT/$name/bench.md" 2>/dev/null | tee -a "$LOG"
    [ $rc -eq 0 ] || { say "bench $name FAILED (rc $rc): see $name.log"; status=1; }
}

run_bench() {
    bench bench-512 --height 512 --width 512 --steps 50 --schedulers ddim --guidance 7.5 --batch 1 \
        --backends "${BENCH_BACKENDS:-diffusers,eager,eager+graphs,compiled}" --export-missing --warmup 2 --runs 10
}

fastest_two() {  # the two fastest fastsd rows of bench-512 (end to end median, steady or not)
    "$PY" - "$OUT/bench-512/bench.json" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["backend"] != "diffusers"]
rows.sort(key=lambda r: r["stages"]["end_to_end"]["median"])
print(",".join(r["backend"] for r in rows[:2]))
EOF
}

run_extra() {
    local two
    two=$(fastest_two 2>>"$LOG") || { say "extra needs bench-512/bench.json: run the bench part first"; status=1; return; }
    say "fastest two at 512x512: $two"
    bench one-step --height 512 --width 512 --steps 1 --guidance 1.0 --backends "diffusers,$two" \
        --export-missing --warmup 3 --runs 20
    if [[ ",$two," == *",compiled,"* ]]; then
        say "compiled: static 1024x1024 build"
        ENGINES="$OUT/engines-1024"
        "$PY" -m fastsd build --model "$MODEL" --backend compiled --static 1024x1024 --engine-dir "$ENGINES" \
            >"$OUT/build-1024.log" 2>&1 || { say "compiled 1024 build FAILED: see build-1024.log"; status=1; }
    fi
    bench bench-1024 --height 1024 --width 1024 --steps 50 --schedulers ddim --guidance 7.5 --batch 1 \
        --backends "diffusers,$two" --warmup 1 --runs 5
}

run_sdxl() {
    say "synthetic:sdxl (random weights, built once)"
    "$PY" -c "from fastsd.checkpoint import resolve; resolve('synthetic:sdxl')" >>"$LOG" 2>&1 \
        || { say "building synthetic:sdxl FAILED: see suite.log"; status=1; return; }
    MODEL=synthetic:sdxl bench bench-sdxl-1024 --height 1024 --width 1024 --steps 30 --schedulers euler \
        --guidance 5.0 --batch 1 --dtype fp16 --backends "${SDXL_BACKENDS:-diffusers,eager,eager+graphs,compiled}" \
        --export-missing --warmup 1 --runs 5
}

run_controlnet() {
    bench bench-controlnet-512 --controlnet synthetic:controlnet-sd15 --height 512 --width 512 --steps 50 \
        --schedulers ddim --guidance 7.5 --batch 1 --dtype fp16 \
        --backends "${CONTROLNET_BACKENDS:-diffusers,eager,eager+graphs,compiled}" --export-missing --warmup 1 --runs 5
}

summary() {
    {
        echo "# fastsd GPU suite, $(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
        echo
        echo "command: bash benchmarks/gpu_suite.sh $PART $OUT (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
        for f in precision-tiny/precision.md precision/precision.md bench-512/bench.md one-step/bench.md bench-1024/bench.md \
                 bench-sdxl-1024/bench.md bench-controlnet-512/bench.md; do
            [ -f "$OUT/$f" ] && { echo; cat "$OUT/$f"; }
        done
        [ -f "$OUT/tests.log" ] && { echo; echo "GPU tests: $(tail -n 1 "$OUT/tests.log")"; }
    } >"$OUT/summary.md"
}

bring
case "$PART" in
    check) ;;
    tests) run_tests ;;
    bench) run_bench ;;
    extra) run_extra ;;
    sdxl) run_sdxl ;;
    controlnet) run_controlnet ;;
    all) run_tests; run_bench; run_extra ;;
esac
summary
say "done ($PART): status $status; summary in $OUT/summary.md"
exit $status
