#!/usr/bin/env bash
# The GPU check (issue #12 item 6): what only a CUDA device can test or measure, in one go, in under 8 minutes.
#
#   bash bench/gpu_check.sh OUTDIR             # on a machine with one GPU, from any folder
#   bash bench/gpu_check.sh --dry-run OUTDIR   # anywhere: print every part's command, import its entry point and
#                                              # parse its arguments (tests/test_gpu_check.py runs this)
#
# Parts, each under its own time budget; a part that fails or runs out of time is recorded and the next one runs:
#   tests    pytest -m gpu over the test files that hold gpu-marked tests     -> gpu_tests.xml (junit)
#   kernel   bench_prograd_update.py --quick: fused vs loop vs a device copy  -> prograd_update.csv
#   train    bench_train_step.py --device cuda, P = 1, 15, 45 on RN50          -> train_step.csv
#   cache    bench_cache.py --device cuda, RN50, generated JPEGs               -> cache.csv
#   memory   bench_memory.py --device cuda, ImageNet size, chunks and auto     -> memory.csv
#   protocol bench_protocol.py --device cuda: step grid, the released code's step, EuroSAT's 45 prompt runs end to
#            end at half the protocol's epochs against the projection              -> protocol.csv
# Budgets add up to 460 s, so the script ends within 8 minutes even when every part runs out of time.
# and at the end summary.csv (part, status, exit code, seconds, budget, rows) and gpu_check.log (every part's output).
# OUTDIR receives these 8 files only; scratch files go to a temporary folder.
#
# Environment: no install is needed. The tree's root goes on PYTHONPATH (fastprompt/__init__.py maps kernels/ and
# cli/ there); PYTHON (default python3, else python) must import torch, triton and the packages that
# bench/gpu_check_parts.py lists in REQUIRED; the first line printed says which are missing. The pure-Python ones a
# CUDA image often lacks (open_clip_torch, ftfy, wcwidth) can come along with the tree:
# `python bench/gpu_check_parts.py bundle` copies them from a working environment into bench/.gpu_check_site
# (git-ignored), which this script puts on PYTHONPATH when it exists (GPU_CHECK_SITE names another folder).
#
# Exit codes: 0 every part passed, or no GPU here (one line says so); 1 a part failed (summary.csv says which);
# 2 usage; 3 the Python environment lacks a package (the line names it).
set -u -o pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$here")"
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
    shift
fi
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash bench/gpu_check.sh [--dry-run] OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR="$(cd "$1" && pwd)"
case "$OUTDIR" in
    *[[:space:]]*) echo "gpu_check: OUTDIR must not contain spaces: '$OUTDIR'" >&2; exit 2 ;;
esac
cd "$ROOT" || exit 2
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if [ -z "$PYTHON" ]; then
    echo "gpu_check: no python3 or python on PATH; set PYTHON=/path/to/python (with torch)"
    exit 3
fi
site_dir="${GPU_CHECK_SITE:-$ROOT/bench/.gpu_check_site}"
if [ -d "$site_dir" ]; then
    export PYTHONPATH="$ROOT:$site_dir${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

# The test files that hold gpu-marked tests (found, not listed, so that a new one is picked up).
gpu_test_files=$(grep -l -E "pytest\.mark\.gpu|marks=pytest\.mark\.gpu" tests/test_*.py | tr '\n' ' ')
workers=$(( $(nproc 2>/dev/null || echo 8) < 8 ? $(nproc 2>/dev/null || echo 8) : 8 ))

# name | budget (s) | output file | command (run with $PYTHON, words split on spaces)
PARTS=(
    "tests|80|gpu_tests.xml|-m pytest -q -p no:cacheprovider -m gpu --junitxml=$OUTDIR/gpu_tests.xml $gpu_test_files"
    "kernel|75|prograd_update.csv|bench/bench_prograd_update.py --quick --out $OUTDIR/prograd_update.csv"
    "train|65|train_step.csv|bench/bench_train_step.py --device cuda --contexts 1 15 45 --repeats 20 --out $OUTDIR/train_step.csv"
    "cache|65|cache.csv|bench/bench_cache.py --device cuda --model RN50 --images 512 --views 4 --num-workers $workers --repeats 2 --out $OUTDIR/cache.csv"
    "memory|80|memory.csv|bench/bench_memory.py --device cuda --contexts 15 45 --chunks none auto auto=4096 --steps 2 --worker-timeout 60 --out $OUTDIR/memory.csv"
    "protocol|95|protocol.csv|bench/bench_protocol.py --device cuda --e2e EuroSAT --epoch-scale 0.5 --repeats 5 --reference-repeats 3 --grid-contexts 1 15 45 --out $OUTDIR/protocol.csv"
)

if [ "$dry_run" = 1 ]; then
    words=()
    for part in "${PARTS[@]}"; do
        IFS='|' read -r name budget output command <<<"$part"
        echo "dry run: part $name (budget ${budget} s, writes $output): $PYTHON $command"
        [ ${#words[@]} -gt 0 ] && words+=("::")
        read -r -a split <<<"$command"
        words+=("${split[@]}")
    done
    exec "$PYTHON" bench/gpu_check_parts.py validate -- "${words[@]}"
fi

"$PYTHON" bench/gpu_check_parts.py env
status=$?
if [ "$status" = 4 ]; then
    exit 0  # no GPU: the line above says so
elif [ "$status" != 0 ]; then
    exit "$status"
fi

log="$OUTDIR/gpu_check.log"
records="$(mktemp)"
scratch="$(mktemp -d)"
trap 'rm -rf "$records" "$scratch"' EXIT
export TMPDIR="$scratch"  # the benches' generated images and caches
: >"$log"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$log" 2>&1
fi
started=$(date +%s)
for part in "${PARTS[@]}"; do
    IFS='|' read -r name budget output command <<<"$part"
    echo "== $name (budget $budget s): $PYTHON $command" | tee -a "$log"
    part_start=$(date +%s)
    read -r -a split <<<"$command"
    if command -v timeout >/dev/null; then
        timeout --kill-after=10 "$budget" "$PYTHON" "${split[@]}" >>"$log" 2>&1
    else
        "$PYTHON" "${split[@]}" >>"$log" 2>&1
    fi
    code=$?
    seconds=$(( $(date +%s) - part_start ))
    echo "== $name: exit $code after $seconds s" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$code" "$seconds" "$budget" "$output" >>"$records"
done
total=$(( $(date +%s) - started ))
"$PYTHON" bench/gpu_check_parts.py summary "$OUTDIR" "$records" "$total" | tee -a "$log"
result=${PIPESTATUS[0]}
echo "gpu_check: total $total s; figures in $OUTDIR" | tee -a "$log"
exit "$result"
