"""Run outputs: WORKDIR/metrics.jsonl, TensorBoard (WORKDIR/tb), evaluation artefacts
(WORKDIR/eval/step_N/), optional Weights & Biases, the loss plot and the progress bar.

Every path goes through `etils.epath`, so a workdir may be local or `gs://bucket/run`
(`s3://...`). What differs on an object store (which cannot append, and where one object
upload is atomic):

- metrics.jsonl is rewritten whole from the kept rows at each write (locally it is appended
  to); rows are small, so a run of thousands of logged steps rewrites a few hundred kB.
- TensorBoard event files go through an epath-backed tensorboardX record writer
  (`EpathRecordWriterFactory`, registered for 'gs' and 's3') that buffers the event bytes
  and rewrites the object on each flush (every `flush_secs`, after each evaluation, on close).
- Local rewrites (the truncated metrics.jsonl, artefacts, the plot) go to a temporary name
  and are then `replace`d (atomic on POSIX); remote ones are a single object upload.

Evaluation artefacts (`mmjax.eval.artefacts.Images` / `Texts`) named with '/' (e.g.
"vqa_0shot/samples") become subfolders: WORKDIR/eval/step_40/vqa_0shot/samples.png. Each
'/'-separated part keeps [A-Za-z0-9._-] and has any other character replaced by '_'.

Weights & Biases (`config.wandb`, process 0 only, `wandb` imported only when enabled): one
run per workdir, its id in WORKDIR/wandb_id.txt so a resumed run continues it; local files
in WORKDIR/wandb. Start-up costs about 1.5 s (import + the wandb-core service).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping

import jax
import numpy as np
import tqdm
from etils import epath

from mmjax.eval import artefacts as artefacts_lib
from mmjax.paths import is_local, write_atomic

log = logging.getLogger("mmjax")

WANDB_MODES = ("online", "offline", "disabled")


# ---- paths ----------------------------------------------------------------------------------
def artefact_relpath(step: int, name: str, ext: str) -> str:
    """eval/step_N/<name>.<ext>, one subfolder per '/' in `name`, unsafe characters -> '_'."""
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in name.split("/")]
    parts = ["_" if p in ("", ".", "..") else p for p in parts]
    return "/".join(["eval", f"step_{int(step)}", *parts[:-1], f"{parts[-1]}.{ext}"])


# ---- TensorBoard on object stores ------------------------------------------------------
class EpathRecordWriter:
    """A tensorboardX record file on any epath: buffers all bytes, rewrites on flush/close."""

    def __init__(self, path):
        self.path = epath.Path(path)
        self._buf = io.BytesIO()
        self._dirty = True  # write the (possibly empty) object on the first flush
        self._lock = threading.Lock()  # tensorboardX flushes from its own thread
        self.closed = False

    def write(self, data: bytes):
        with self._lock:
            self._buf.write(data)
            self._dirty = True

    def flush(self):
        with self._lock:  # held across the upload, so an older snapshot never lands last
            if not self._dirty:
                return
            write_atomic(self.path, self._buf.getvalue())
            self._dirty = False

    def close(self):
        if not self.closed:
            self.flush()
            self.closed = True


class EpathRecordWriterFactory:
    """tensorboardX's record-writer factory interface (see tensorboardX/record_writer.py)."""

    def open(self, path):
        return EpathRecordWriter(path)

    def directory_check(self, path):
        if is_local(path):  # object stores have no directories to create
            epath.Path(path).mkdir(parents=True, exist_ok=True)


def register_tensorboard_writers(prefixes=("gs", "s3")) -> None:
    """Routes tensorboardX's gs:// and s3:// event files through epath (replaces its own
    GCS writer, which needs google-cloud-storage, and S3 writer, which needs boto3)."""
    from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel

    for prefix in prefixes:
        if not isinstance(record_writer.REGISTERED_FACTORIES.get(prefix), EpathRecordWriterFactory):
            record_writer.register_writer_factory(prefix, EpathRecordWriterFactory())


# ---- the writer --------------------------------------------------------------------------
class MetricWriter:
    """One JSON object per logged step in WORKDIR/metrics.jsonl, TensorBoard scalars/images
    under WORKDIR/tb, evaluation artefacts under WORKDIR/eval/step_N/, and optionally W&B.

    On resume, rows past `resume_step` are dropped (and TensorBoard purges its events past
    it). `enabled=False` (processes other than 0) writes nothing; `write` still returns the
    row. `wandb` is the config's `wandb` section (dict or ConfigDict, keys enabled, project,
    entity, name, mode, tags); `run_config` is what W&B records as the run's config.
    """

    def __init__(self, workdir, resume_step: int = 0, enabled: bool = True, wandb=None, run_config=None):
        self.enabled = bool(enabled)
        self.workdir = epath.Path(workdir).expanduser()
        self.path = self.workdir / "metrics.jsonl"
        self.local = is_local(self.workdir)
        self._tb = None
        self._wandb = None
        self._rows: list[str] = []  # remote only: the file's lines, rewritten whole per write
        wandb_cfg = _wandb_config(wandb)  # validated on every process, so a typo fails everywhere
        if not self.enabled:
            return
        if wandb_cfg is not None:
            _import_wandb()  # fail before touching any file when it is missing
        if self.local:
            self.workdir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = _kept_lines(self.path.read_text(), resume_step)
            write_atomic(self.path, "".join(kept))
            if not self.local:
                self._rows = kept
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        if not self.local:
            register_tensorboard_writers()
        # purge_step: TensorBoard hides earlier files' events past the restored step. The
        # suffix keeps a restart within the same second from overwriting the last event file
        # (tensorboardX names them by the second).
        self._tb = SummaryWriter(
            os.fspath(self.workdir / "tb"),
            purge_step=int(resume_step) + 1,
            filename_suffix=f".{uuid.uuid4().hex[:8]}",
        )
        if wandb_cfg is not None:
            try:
                self._wandb = _WandbRun(self.workdir, wandb_cfg, run_config)
            except BaseException:
                self.close()
                raise

    # -- scalars
    def write(self, step: int, metrics: Mapping) -> dict:
        """Logs scalars (jax/numpy scalars or numbers) at `step`; returns the Python row."""
        row = {"step": int(step), **_to_python(metrics)}
        if self.enabled:
            self._log(row, row)
        return row

    def _log(self, row: dict, scalars: dict):
        line = json.dumps(row) + "\n"
        if self.local:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._rows.append(line)
            write_atomic(self.path, "".join(self._rows))
        step = row["step"]
        for k, v in scalars.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in scalars.items() if k != "step"}, step)

    # -- evaluation results
    def write_eval(self, step: int, results: Mapping) -> dict:
        """Logs `{name: float | Images | Texts}` at `step`.

        Floats are logged like `write`. Each `Images` becomes WORKDIR/eval/step_N/<name>.png
        (a `grid`), a TensorBoard image and a W&B image list; each `Texts` becomes
        WORKDIR/eval/step_N/<name>.jsonl, a TensorBoard text table and a W&B table. The
        metrics.jsonl row holds the floats plus, per artefact, `name: relative path`.
        Returns the scalar row ({"step": N, float names...}).
        """
        step = int(step)
        scalars, arts = {}, {}
        for name, v in results.items():
            if isinstance(v, artefacts_lib.ARTEFACTS):
                arts[name] = v
            elif _is_scalar(v):
                scalars[name] = v
            else:
                raise TypeError(
                    f"write_eval: result {name!r} is a {type(v).__name__}; expected a float, "
                    "mmjax.eval.artefacts.Images or mmjax.eval.artefacts.Texts"
                )
        scalar_row = {"step": step, **_to_python(scalars)}
        if not self.enabled:
            return scalar_row
        row = dict(scalar_row)
        for name, art in arts.items():
            rel, pixels = _save_artefact(self.workdir, step, name, art)
            if pixels is not None:
                self._tb.add_image(name, pixels, step, dataformats="HWC")
            else:
                self._tb.add_text(name, _markdown_table(art), step)
            row[name] = rel
        self._log(row, scalar_row)
        if arts:
            if self._wandb is not None:
                self._wandb.log_artefacts(arts, step)
            self._tb.flush()  # show them now (remotely: one rewrite of the event object)
        return scalar_row

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_artefacts(workdir, step: int, results: Mapping) -> dict[str, str]:
    """Writes the artefacts among `results` (others are skipped) to WORKDIR/eval/step_N/;
    returns {name: path relative to the workdir}. No metrics.jsonl, TensorBoard or W&B."""
    workdir = epath.Path(workdir)
    return {
        name: _save_artefact(workdir, int(step), name, v)[0]
        for name, v in results.items()
        if isinstance(v, artefacts_lib.ARTEFACTS)
    }


def _save_artefact(workdir: epath.Path, step: int, name: str, art):
    """(relative path, grid pixels or None): Images -> <name>.png, Texts -> <name>.jsonl."""
    if isinstance(art, artefacts_lib.Images):
        rel, pixels = artefact_relpath(step, name, "png"), art.grid()
        write_atomic(workdir / rel, _png(pixels))
        return rel, pixels
    rel = artefact_relpath(step, name, "jsonl")
    write_atomic(workdir / rel, art.jsonl())
    return rel, None


def _kept_lines(text: str, resume_step: int) -> list[str]:
    kept = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):  # e.g. a line cut short by a crash
            log.warning("metrics.jsonl: dropping unreadable line %d: %.80s", i + 1, line)
            continue
        if step <= resume_step:
            kept.append(line + "\n")
    return kept


def _is_scalar(v) -> bool:
    if isinstance(v, (bool, int, float, np.generic)):
        return True
    return hasattr(v, "shape") and hasattr(v, "dtype") and math.prod(v.shape) == 1


def _to_python(metrics: Mapping) -> dict:
    keys = list(metrics)
    values = jax.device_get([metrics[k] for k in keys])  # one transfer for all; keeps the key order
    return {k: _scalar(v) for k, v in zip(keys, values)}


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image  # pylint: disable=import-outside-toplevel

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _markdown_table(texts, max_rows: int = 64) -> str:
    cols = texts.columns()

    def cell(v):
        s = v if isinstance(v, str) else json.dumps(v)
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in texts.rows[:max_rows]]
    if len(texts.rows) > max_rows:
        lines.append(f"\n({len(texts.rows) - max_rows} more rows in the .jsonl file)")
    return "\n".join(lines)


# ---- Weights & Biases --------------------------------------------------------------------
def _wandb_config(cfg) -> dict | None:
    """The enabled W&B section as a plain dict, or None when off."""
    if cfg is None:
        return None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    mode = cfg.get("mode", "online") or "online"
    if mode not in WANDB_MODES:
        raise ValueError(f"config.wandb.mode must be one of {WANDB_MODES}, got {mode!r}")
    if not cfg.get("enabled", False) or mode == "disabled":
        return None
    tags = cfg.get("tags") or ()
    if isinstance(tags, str):  # --config.wandb.tags=a,b
        tags = tags.split(",")
    tags = [str(t).strip() for t in tags if str(t).strip()]
    return {
        "project": cfg.get("project") or "mmjax",
        "entity": cfg.get("entity") or None,
        "name": cfg.get("name") or None,
        "mode": mode,
        "tags": tags,
    }


def _import_wandb():
    try:
        import wandb  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(
            "config.wandb.enabled=True but the wandb package is not installed: `pip install wandb` "
            "(or set --config.wandb.enabled=False)"
        ) from e
    return wandb


class _WandbRun:
    """One W&B run per workdir: its id lives in WORKDIR/wandb_id.txt, so a resumed training
    run continues the same W&B run (resume="allow"). W&B's local files go to WORKDIR/wandb
    for a local workdir, to $WANDB_DIR or a temporary directory for a remote one.

    W&B ignores steps below the last one it has; after resuming from a checkpoint older
    than the last logged step, the re-done steps show up there once they pass it.
    """

    def __init__(self, workdir: epath.Path, cfg: dict, run_config):
        self.wandb = wandb = _import_wandb()
        id_file = workdir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:16]
            write_atomic(id_file, run_id + "\n")
        if is_local(workdir):
            local_dir = os.fspath(workdir)  # W&B puts its files in DIR/wandb
        else:
            local_dir = os.environ.get("WANDB_DIR") or tempfile.mkdtemp(prefix="mmjax-wandb-")
        os.makedirs(os.path.join(local_dir, "wandb"), exist_ok=True)
        t0 = time.perf_counter()
        self.run = wandb.init(
            project=cfg["project"],
            entity=cfg["entity"],
            name=cfg["name"],
            mode=cfg["mode"],
            tags=cfg["tags"],
            config=dict(run_config) if run_config is not None else None,
            dir=local_dir,
            resume="allow",
            id=run_id,
        )
        log.info("wandb: run %s (%s) started in %.1fs", run_id, cfg["mode"], time.perf_counter() - t0)

    def log(self, scalars: dict, step: int):
        values = {k: v for k, v in scalars.items() if isinstance(v, (int, float))}
        if values:
            self.run.log(values, step=step)

    def log_artefacts(self, arts: dict, step: int):
        """Images -> a list of wandb.Image (captioned); Texts -> a wandb.Table."""
        wandb, data = self.wandb, {}
        for name, art in arts.items():
            if isinstance(art, artefacts_lib.Images):
                caps = art.captions or (None,) * len(art.images)
                data[name] = [wandb.Image(img, caption=c) for img, c in zip(art.images, caps)]
                continue
            cols = art.columns()
            rows = [[_table_cell(r.get(c)) for c in cols] for r in art.rows]
            data[name] = wandb.Table(columns=cols, data=rows)
        self.run.log(data, step=step)

    def finish(self):
        self.run.finish()


def _table_cell(v):
    return v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v)


# ---- the loss plot -----------------------------------------------------------------------
def read_rows(workdir) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (unreadable lines skipped)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"no metrics to plot: {path} does not exist (has this run logged a step yet?)"
        )
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def plot(workdir, out=None) -> epath.Path:
    """Writes WORKDIR/loss.png (or `out`) from WORKDIR/metrics.jsonl and returns its path.

    Top: the training `loss` against step (`loss/<component>` curves as thinner lines; a
    light smoothed line when there are many points; log scale when it spans > 1.5 decades).
    Bottom, when present: the evaluation scalars, i.e. numeric keys that appear only on
    rows without a training loss (e.g. "val/f1", "vqa_0shot/accuracy").
    """
    path = epath.Path(workdir) / "metrics.jsonl"
    rows = read_rows(workdir)
    train = [r for r in rows if _num(r.get("loss")) is not None]
    others = [r for r in rows if _num(r.get("loss")) is None]
    train_keys = {k for r in train for k in r}
    eval_keys = list(
        dict.fromkeys(
            k
            for r in others
            for k, v in r.items()
            if k != "step" and k not in train_keys and _num(v) is not None
        )
    )
    if not train and not eval_keys:
        raise ValueError(f"no metrics to plot: {path} has no training loss and no evaluation scalars")

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel

    panels = 2 if (train and eval_keys) else 1
    fig = Figure(figsize=(9, 4.2 * panels), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    name = epath.Path(workdir).name or os.fspath(workdir)
    if train:
        ax = axes[0]
        steps, loss = _series(train, "loss")
        marker = "o" if len(steps) <= 20 else None
        ax.plot(steps, loss, color="C0", lw=1.4, marker=marker, ms=3, label="loss")
        finite = loss[np.isfinite(loss)]
        if len(finite) >= 50:
            ax.plot(steps, _ema(loss, len(loss)), color="C0", lw=3.5, alpha=0.3, label="loss (smoothed)")
        comps = [k for k in dict.fromkeys(k for r in train for k in r) if k.startswith("loss/")]
        for i, k in enumerate(comps):
            s, v = _series(train, k)
            ax.plot(s, v, color=f"C{(i + 1) % 10}", lw=0.8, alpha=0.8, marker=marker, ms=2, label=k)
        allv = np.concatenate([finite] + [_series(train, k)[1] for k in comps])
        allv = allv[np.isfinite(allv)]
        if len(allv) and allv.min() > 0 and allv.max() / allv.min() > 10**1.5:
            ax.set_yscale("log")
        ax.set_title(f"training loss: {name}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    if eval_keys:
        ax = axes[-1]
        for i, k in enumerate(eval_keys):
            s, v = _series(others, k)
            ax.plot(s, v, color=f"C{i % 10}", lw=1.2, marker="o", ms=3, label=k)
        ax.set_title("evaluation" if train else f"evaluation: {name}")
        ax.set_xlabel("step")
        ax.set_ylabel("value")
        ax.grid(alpha=0.3)
        small = "x-small" if len(eval_keys) > 6 else "small"
        ax.legend(fontsize=small, loc="best", ncol=1 + len(eval_keys) // 12)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    dest = epath.Path(out) if out is not None else epath.Path(workdir) / "loss.png"
    write_atomic(dest, buf.getvalue())
    return dest


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _series(rows, key):
    pts = [(r["step"], _num(r[key])) for r in rows if _num(r.get(key)) is not None]
    pts.sort(key=lambda p: p[0])
    return np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)


def _ema(values: np.ndarray, n: int) -> np.ndarray:
    """Exponential moving average (debiased) over finite values; window ~ n / 20."""
    alpha = 1.0 / max(2.0, n / 20.0)
    out, m, w = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            m, w = (1 - alpha) * m + alpha * v, (1 - alpha) * w + alpha
        out[i] = m / w if w else np.nan
    return out


# ---- the terminal ------------------------------------------------------------------------
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
