"""The markdown table of BENCHMARKS.md section 18 from `plan_table.sh OUT_DIR`'s results: one row per
config, stage and topology (the last run of each), in the table's order.

  python benchmarks/plan_table.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from plan_state import CONFIGS  # this folder's: the full-scale configs

from mmjax import plan

G = 2**30
TOPOLOGIES = ("v5p:2x2x2", "v5e:2x4", "v5p:4x4x4", "v5e:8x8", "v5p:4x8x8", "v5e:16x16")
COLUMNS = (
    "config", "stage", "topology", "chips", "mesh data x fsdp x expert x tensor",
    "params (frozen models apart)", "state GiB/dev (exact)", "1/N ideal GiB", "state / ideal",
    "temporaries GiB (TPU compiler)", "peak GiB", "usable HBM GiB", "fits", "matmul PFLOP/step",
    "compiler TFLOP/dev", "command wall s", "peak RSS GiB",
)  # fmt: skip


def runs(out: Path) -> dict:
    """(config, topology) -> (exit code, wall s, peak RSS GiB), the last log line of each."""
    found = {}
    for line in (out / "log").read_text().splitlines():
        _, cfg, topo, rc, wall, rss, _ = line.split()
        rss = rss.split("=")[1]
        found[cfg, topo] = (rc.split("=")[1], float(wall.split("=")[1]), int(rss or 0) / 2**20)
    return found


def cells(cfg: str, topo: str, r: dict) -> list[str]:
    mesh = "x".join(str(r["mesh"][k]) for k in ("data", "fsdp", "expert", "tensor"))
    hbm = plan.HBM_GIB[r["device_kind"]]
    if "oom" in r:
        at = f" (compile aborted at {r['temp_bytes'] / G:.0f})" if "temp_bytes" in r else ""
        temp, peak, fits = f"> HBM{at}", "-", "no (OOM)"
    else:
        temp, peak = f"{r['temp_bytes'] / G:.2f}", f"{r['peak_bytes'] / G:.2f}"
        fits = "yes" if plan.fits(r) else "no"
    cf = r.get("compiler_flops_per_device")
    return [
        f"`{cfg}`", r.get("stage", ""), topo, str(r["devices"]), mesh, f"{r['num_params'] / 1e9:.2f}B",
        f"{r['state_bytes'] / G:.3f}", f"{r['state_ideal_bytes'] / G:.3f}",
        f"{r['state_bytes'] / r['state_ideal_bytes']:.2f}", temp, peak, str(hbm), fits,
        f"{r['matmul_flops'] / 1e15:.2f}", "-" if cf is None else f"{cf / 1e12:.1f}",
    ]  # fmt: skip


def main(out: Path) -> None:
    found = runs(out)
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for topo in TOPOLOGIES:
        for cfg in (f"configs/{c}" for c in CONFIGS):
            if (cfg, topo) not in found:
                continue
            rc, wall, rss = found[cfg, topo]
            name = re.sub(r"[/:]", "_", f"{cfg}-{topo}")
            text = (out / f"{name}.json").read_text() if (out / f"{name}.json").exists() else ""
            stages = [json.loads(line) for line in text.splitlines() if line.strip()]
            if rc != "0" or not stages:  # the reason in the temporaries column
                err = (out / f"{name}.err").read_text() if (out / f"{name}.err").exists() else ""
                why = re.findall(r"^\w*(?:Error|Exception)\b.*$|^mmjax plan:.*$", err, re.M) or ["?"]
                what = f"timed out after {wall / 60:.0f} min" if rc in ("124", "143") else why[-1][:160]
                row = [f"`{cfg}`", "", topo, *[""] * 6, what, *[""] * 5, f"{wall:.0f}", f"{rss:.1f}"]
                print("| " + " | ".join(row) + " |")
                continue
            for i, r in enumerate(stages):
                first = [f"{wall:.0f}", f"{rss:.1f}"] if i == 0 else ["(same command)", ""]
                print("| " + " | ".join(cells(cfg, topo, r) + first) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
