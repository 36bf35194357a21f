"""Run metrics: DIR/metrics.jsonl, TensorBoard event files, and a terminal progress bar."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
import tqdm


class MetricWriter:
    """Writes one JSON object per logged step; on resume drops lines past the restored step."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [l for l in f if l.strip() and json.loads(l)["step"] <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        return row

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _scalar(v):
    v = np.asarray(jax.device_get(v))
    return v.item() if v.size == 1 else v.tolist()


class Progress:
    """tqdm bar with step throughput, examples/s and ETA (process 0 only)."""

    def __init__(self, start: int, total: int, batch_size: int, enabled: bool = True):
        self.batch_size = batch_size
        self.bar = tqdm.tqdm(
            total=total,
            initial=start,
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
            file=sys.stderr,
            mininterval=0.5 if sys.stderr.isatty() else 30,
        )
        self._t, self._n = time.perf_counter(), start

    def update(self, step: int, loss: float | None = None):
        self.bar.update(step - self.bar.n)
        if loss is not None:
            now = time.perf_counter()
            rate = (step - self._n) * self.batch_size / max(now - self._t, 1e-9)
            self._t, self._n = now, step
            self.bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:.0f}", refresh=False)

    def close(self):
        self.bar.close()
