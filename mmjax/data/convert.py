"""`mmjax data convert` and `mmjax data inspect`.

convert: a folder of images (with or without captions.jsonl) or a directory of WebDataset tar
shards into ArrayRecord shards in mmjax's record schema (`sources.write_array_record`): the
encoded image bytes as they were (each checked to decode first; a bad one is skipped and counted
with its reason), text, key, metadata. Shard s holds records [s * shard_size, (s + 1) *
shard_size) of the source, so the output order is the source's. Shards are written by a pool of
processes, each to a temporary name renamed when complete, then `NAME.stats.json`; a rerun skips
the shards that have theirs, so an interrupted conversion resumes. `_stats.json` sums them:
records, bytes, skipped by reason.

inspect: a source's size, schema and first records, and a PNG grid of its images with captions.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import time

import numpy as np
from etils import epath
from PIL import Image

from mmjax.config import ConfigError, component
from mmjax.data import decode, sources
from mmjax.paths import resolve, write_atomic

CONVERTIBLE = {"image_folder": sources.ImageFolder, "webdataset": sources.WebDataset}


def guess_source(path) -> str:
    """The source kind a path holds: tfds, webdataset, array_record or image_folder."""
    root = resolve(path)
    if not root.exists():
        raise ConfigError(f"{path} does not exist")
    if not root.is_dir():
        return "webdataset" if root.name.endswith(".tar") else "array_record"
    names = [p.name for p in root.iterdir()]
    if "dataset_info.json" in names:
        return "tfds"
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if any(".array_record" in n for n in names):
        return "array_record"
    return "image_folder"


def _shard_name(s: int, num: int) -> str:
    return f"data-{s:05d}-of-{num:05d}"


def _convert_shard(source, first: int, stop: int, dst: str, name: str) -> dict:
    """Writes records [first, stop) of `source` to DST/NAME.array_record; returns its stats."""
    skipped, nbytes = {}, 0

    def records():
        nonlocal nbytes
        for i in range(first, stop):
            try:
                key, data, text, meta = source.raw(i)
            except (OSError, ValueError, RuntimeError) as e:
                reason = f"unreadable ({type(e).__name__})"
            else:
                reason = decode.decode(data, 64).reason  # decodable (JPEGs at reduced size)
                if not reason:
                    nbytes += len(data)
                    yield {**meta, "image": data, "text": text, "key": key}
                    continue
            skipped[reason] = skipped.get(reason, 0) + 1

    folder = epath.Path(dst)
    tmp = folder / f"_tmp_{name}"
    written = sources.write_array_record(tmp, records())
    tmp.rename(folder / f"{name}.array_record")
    stats = {"records": written, "bytes": nbytes, "skipped": skipped}
    write_atomic(folder / f"{name}.stats.json", json.dumps(stats))
    return stats


def convert(
    src, dst, source: str = "", shard_size: int = 4096, workers: int = 0, progress: bool = True
) -> dict:
    """Converts SRC (an image folder or WebDataset shards) into ArrayRecord shards in DST."""
    kind = source or guess_source(src)
    if kind not in CONVERTIBLE:
        raise ConfigError(f"mmjax data convert reads {' or '.join(CONVERTIBLE)}; {src} holds {kind}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size={shard_size} must be >= 1")
    start = time.perf_counter()
    reader = CONVERTIBLE[kind](component(source=kind, path=str(src)), 64)
    n = len(reader)
    num = math.ceil(n / shard_size)
    out = resolve(dst)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"source": kind, "src": str(src), "records": n, "shard_size": shard_size, "shards": num}
    plan_file = out / "_convert.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != plan:
        raise ConfigError(
            f"{dst} holds a conversion with other settings ({plan_file.read_text()}); convert into a new folder "
            f"or rerun with the same source and --shard-size"
        )
    write_atomic(plan_file, json.dumps(plan))
    names = [_shard_name(s, num) for s in range(num)]
    todo = [s for s in range(num) if not (out / f"{names[s]}.stats.json").exists()]
    jobs = [(reader, s * shard_size, min(n, (s + 1) * shard_size), os.fspath(out), names[s]) for s in todo]
    workers = workers or os.cpu_count() or 1
    from tqdm import tqdm

    bar = tqdm(total=n, initial=n - sum(j[2] - j[1] for j in jobs), unit="rec", disable=not progress)
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            _convert_shard(*job)
            bar.update(job[2] - job[1])
    else:
        ctx = multiprocessing.get_context("spawn")  # no forked JAX or grain state in the workers
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(_convert_shard, *job): job for job in jobs}
            for f in concurrent.futures.as_completed(futures):
                f.result()
                job = futures[f]
                bar.update(job[2] - job[1])
    bar.close()
    total = {"records": 0, "bytes": 0, "skipped": {}}
    for name in names:
        st = json.loads((out / f"{name}.stats.json").read_text())
        total["records"] += st["records"]
        total["bytes"] += st["bytes"]
        for reason, c in st["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + c
    for reason, c in reader.skipped_in_index.items():
        total["skipped"][reason] = total["skipped"].get(reason, 0) + c
    stats = {**plan, **total, "converted_now": len(jobs), "seconds": round(time.perf_counter() - start, 3)}
    write_atomic(out / "_stats.json", json.dumps(stats, indent=1))
    return stats


def inspect(path, source: str = "", n: int = 4, grid: str = "", size: int = 128) -> dict:
    """A source's size, schema, first `n` records and (with `grid`) a PNG of up to 16 images."""
    from mmjax.data import pipeline
    from mmjax.eval import artefacts

    kind = source or guess_source(path)
    src = pipeline.make_source(component(source=kind, path=str(path)), size, cache=False)
    good, bad, i = [], {}, 0
    want = max(n, 16 if grid else 0)
    while len(good) < want and i < len(src):
        r = src[i]
        i += 1
        if sources.keep(r):
            good.append(r)
        else:
            bad[r["_skip"]] = bad.get(r["_skip"], 0) + 1

    def describe(v):
        if isinstance(v, np.ndarray):
            return f"{v.dtype}{list(v.shape)}"
        return type(v).__name__

    out = {
        "source": repr(src),
        "records": len(src),
        "skipped_in_index": dict(getattr(src, "skipped_in_index", {})),
        "skipped_in_first": {"read": i, **bad},
        "schema": {k: describe(v) for k, v in good[0].items()} if good else {},
        "first": [
            {"index": int(r["index"])}
            | {
                k: v if isinstance(v, (str, int, float)) else describe(v)
                for k, v in r.items()
                if k not in ("image", "index")
            }
            for r in good[:n]
        ],
    }
    if grid and good:
        tiles = good[:16]
        image = artefacts.grid(np.stack([r["image"] for r in tiles]), 4, [r.get("text", "") for r in tiles])
        resolve(grid).parent.mkdir(parents=True, exist_ok=True)
        with resolve(grid).open("wb") as f:
            Image.fromarray(image).save(f, "PNG")
        out["grid"] = str(grid)
    return out
