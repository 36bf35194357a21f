#!/usr/bin/env bash
# MM1's connector ablation on the shapes world (RESULTS.md): average pooling, attention pooling
# and C-Abstractor, each at two visual-token counts, equal steps. Each run pre-trains
# configs/mm1.py:tiny, exports, fine-tunes tiny_sft and evaluates; then a table is printed.
#   bash launch/mm1_connector_ablation.sh [OUT=workdirs/ablation] [PT_STEPS=1000] [SFT_STEPS=300]
set -euo pipefail
OUT=${1:-workdirs/ablation}
PT_STEPS=${2:-1000}
SFT_STEPS=${3:-300}
mkdir -p "$OUT"
for kind in avg_pool attn_pool c_abstractor; do
  for tokens in 4 16; do
    run="$OUT/${kind}_${tokens}"
    model=(--config.model.connector.kind=$kind --config.model.connector.num_tokens=$tokens)
    mmjax train --config configs/mm1.py:tiny --workdir "$run/pt" "${model[@]}" \
      --config.train.steps=$PT_STEPS --config.train.save_every=$PT_STEPS >"$run.pt.log" 2>&1
    mmjax export --config configs/mm1.py:tiny --workdir "$run/pt" "${model[@]}" >/dev/null 2>&1
    mmjax train --config configs/mm1.py:tiny_sft --workdir "$run/sft" "${model[@]}" \
      --config.init.mm1.path="$run/pt/export" --config.train.steps=$SFT_STEPS \
      --config.evals.vqa_0shot.num_examples=512 >"$run.sft.log" 2>&1
    echo "done $run"
  done
done
python - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]
def rows(path):
    return [json.loads(l) for l in open(os.path.join(path, "metrics.jsonl"))]

def last(path):  # the final values of every metric (training and evaluators)
    merged = {}
    for r in rows(path):
        merged.update(r)
    return merged

print("| connector | visual tokens | pre-train loss (last 100 steps) | caption 0-shot | caption 4-shot "
      "| VQA 0-shot after SFT | VQA prior | colour questions | colour prior |")
print("|---|---|---|---|---|---|---|---|---|")
for kind in ("avg_pool", "attn_pool", "c_abstractor"):
    for tokens in (4, 16):
        run = f"{out}/{kind}_{tokens}"
        losses = [r["loss"] for r in rows(f"{run}/pt") if "loss" in r][-5:]
        pt, sft = last(f"{run}/pt"), last(f"{run}/sft")
        v = "vqa_0shot/"
        print(f"| {kind} | {tokens} | {sum(losses) / len(losses):.3f} | {pt['caption_0shot/accuracy']:.3f} | "
              f"{pt['caption_4shot/accuracy']:.3f} | {sft[v + 'accuracy']:.3f} | {sft[v + 'prior']:.3f} | "
              f"{sft[v + 'accuracy/color']:.3f} | {sft[v + 'prior/color']:.3f} |")
EOF
