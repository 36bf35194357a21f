#!/bin/bash
# BENCHMARKS.md section 18: `mmjax plan` for every full-scale config on v5p / v5e slices of 8, 64
# and 256 chips, compiled by libtpu (pip install -e ".[tpu]") on this CPU host, JOBS at a time.
#   bash benchmarks/plan_table.sh OUT_DIR [JOBS=2] [TIMEOUT_S=3000] [ROWS_FILE]
# ROWS_FILE: "config topology" lines to run instead of the whole table (cheapest compiles first;
# IOMM's two stages take 30-40 min a row).
# Each row writes OUT_DIR/<config>-<topology>.json (one JSON line per stage) and .err, and a line
# to OUT_DIR/log: time, config, topology, exit code (124: timed out), wall s, peak RSS, load.
set -euo pipefail
out=$(realpath "${1:?usage: plan_table.sh OUT_DIR [JOBS] [TIMEOUT_S]}")
jobs=${2:-2}
export OUT=$out TMO=${3:-3000}
mkdir -p "$out"
row() {
  local name
  name=$(echo "$1-$2" | tr '/:' '__')
  local start rc=0
  start=$(date +%s)
  ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu timeout "$TMO" /usr/bin/time -v \
    python -m mmjax.cli plan --config "$1" --topology "$2" --json >"$OUT/$name.json" 2>"$OUT/$name.err" || rc=$?
  echo "$(date -u +%H:%M:%S) $1 $2 rc=$rc wall=$(($(date +%s) - start))" \
    "rss_kb=$(awk '/Maximum resident/ {print $NF}' "$OUT/$name.err") load=$(cut -d' ' -f1 /proc/loadavg)" >>"$OUT/log"
}
export -f row
table() {
  for cfg in mm1.py:1b mm1.py:3b mm1.py:3b_moe mmgem.py:l14 unicode.py:7b iomm.py:b; do
    for topo in v5p:2x2x2 v5e:2x4 v5p:4x4x4 v5e:8x8 v5p:4x8x8 v5e:16x16; do
      echo "configs/$cfg $topo"
    done
  done
}
if [[ -n ${4:-} ]]; then cat "$4"; else table; fi | xargs -P "$jobs" -L 1 bash -c 'row "$0" "$1"'
