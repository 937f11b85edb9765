#!/usr/bin/env bash
# Both papers' comparison at BERT-Base in one GPU window: `compare.py --window gpu` under a deadline, then its
# report from whatever finished, copied with the logs into $OUT. See experiments/README.md, "BERT-Base in one
# GPU window", for the plan, the device call and what the run can tell.
#
#   bash experiments/gpu_window.sh stage                      # here, once: the shared corpus into .corpus/ (19 MB,
#                                                             # git-ignored), as ../shared does not reach the GPU
#   OUT=/path bash experiments/gpu_window.sh                  # on the GPU machine (the device tool sets OUT)
#   OUT=$(mktemp -d) WINDOW=cpu-dry-run bash experiments/gpu_window.sh   # the same steps on a CPU, tiny model
#                                                             # (COSTS=FILE: plan from these stage costs, not timed here)
#
# $OUT receives results.md, results.json, val_loss.svg, console.log and logs.tar.gz (each run's log.jsonl and
# window_times.json); the runs and their checkpoints (1.3 GB each) stay in $RUNS. Run again on the same machine,
# the command skips finished runs and resumes a cut one from its last checkpoint.
set -uo pipefail
cd "$(dirname "$0")/.."
WINDOW=${WINDOW:-gpu}
RUNS=${RUNS:-/tmp/gpu-window-$WINDOW}
DEADLINE_S=${DEADLINE_S:-500}  # training stops here (SIGTERM: each run saves and exits); the report takes < 40 s

if [ "${1:-}" = stage ]; then
    mkdir -p .corpus/brown
    cp -r ../shared/data/gutenberg ../shared/data/wikitext-2-raw .corpus/
    cp ../shared/data/brown/brown.txt .corpus/brown/
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.corpus/' "$exclude" 2>/dev/null || echo '/.corpus/' >> "$exclude"
    du -sh .corpus
    exit 0
fi

: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$RUNS"
if [ "$WINDOW" = gpu ]; then
    flags=(--corpus .corpus/gutenberg .corpus/brown/brown.txt .corpus/wikitext-2-raw)
elif [ -n "${COSTS:-}" ]; then  # the dry run, planned from given stage costs of the tiny model
    flags=(--window-costs "$COSTS")
else  # the dry run, planned from the tiny model's stage costs timed here first (seconds on an idle CPU)
    python3 experiments/cost_model.py --preset tiny --vocab-size 1024 --batch 8 --seq 32 --repeats 3 \
        --measure "$RUNS/stage_costs.json" --out "$RUNS/cost_model" > "$RUNS/cost_model.log" || exit 1
    flags=(--window-costs "$RUNS/stage_costs.json")
fi
compare=(python3 experiments/compare.py --window "$WINDOW" --out "$RUNS" "${flags[@]}")
export PYTHONUNBUFFERED=1
start=$SECONDS
timeout --kill-after 30 "$DEADLINE_S" "${compare[@]}" 2>&1 | tee "$OUT/console.log" ||
    "${compare[@]}" --report-only 2>&1 | tee -a "$OUT/console.log"  # cut short or failed: report what finished
echo "whole command: $((SECONDS - start)) s ($WINDOW window, deadline $DEADLINE_S s for training)" | tee -a "$OUT/console.log"
for f in results.md results.json val_loss.svg; do [ -f "$RUNS/$f" ] && cp "$RUNS/$f" "$OUT/"; done
(cd "$RUNS" && tar czf "$OUT/logs.tar.gz" --ignore-failed-read window_times.json */log.jsonl)
