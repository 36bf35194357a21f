"""IOMM's main job, timed: shapes-eval against wall-clock time for `configs/iomm.py:tiny`.

Runs the README's first command (`mmjax train --config configs/iomm.py:tiny`) in a subprocess
with evaluations every `--eval-every` steps of each generator stage, watches the stages'
metrics.jsonl and records when each evaluation lands (seconds since the command started, the
MLLM's training included). Goal: geneval/overall >= 0.80 within 15 minutes on a 2-core CPU.

  python benchmarks/iomm_time_to_quality.py --eval-every 250 [--override stage1.train.steps=2000 ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import common

KEYS = ("reconstruct/exact", "geneval/overall", "geneval/held_out", "edit/correct", "loss")


def rows_of(workdir: str, stage: str) -> list[dict]:
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().endswith("}")]


def main():
    p = common.parser(__doc__)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--workdir", default="")
    p.add_argument("--override", action="append", default=[], help="extra --config.KEY=VALUE (no prefix)")
    args = p.parse_args()
    workdir = args.workdir or common.tempdir("iomm_ttq_")
    cmd = [
        sys.executable,
        "-m",
        "mmjax.cli",
        "train",
        "--config",
        "configs/iomm.py:tiny",
        "--workdir",
        workdir,
        f"--config.stage1.train.eval_every={args.eval_every}",
        f"--config.stage2.train.eval_every={args.eval_every}",
        *(f"--config.{o}" for o in args.override),
    ]
    monitor = common.CpuMonitor()
    start, seen, points = time.perf_counter(), set(), []
    log_path = os.path.join(workdir, "chain.log")
    os.makedirs(workdir, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)

    def scan():
        for stage in ("stage1", "stage2"):
            for r in rows_of(workdir, stage):
                if (stage, r["step"]) not in seen and any(k in r for k in KEYS[:4]):
                    seen.add((stage, r["step"]))
                    at = round(time.perf_counter() - start, 1)
                    points.append(
                        {
                            "seconds": at,
                            "stage": stage,
                            "step": r["step"],
                            **{k: r[k] for k in KEYS if k in r},
                        }
                    )

    while proc.poll() is None:
        scan()
        time.sleep(2)
    scan()
    with open(log_path) as f:
        log = f.read()
    total = round(time.perf_counter() - start, 1)
    if proc.returncode:
        sys.exit(f"the chain failed ({proc.returncode}):\n{log[-3000:]}")
    columns = ["seconds", "stage", "step", *KEYS[:4]]
    common.report(
        "iomm_time_to_quality",
        monitor,
        [(f"shapes-eval against wall-clock time (the whole chain took {total} s)", points, columns)],
        {"points": points, "total_s": total, "tail": log[-2000:]},
    )
    print(log[-1500:])


if __name__ == "__main__":
    main()
