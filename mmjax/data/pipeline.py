"""Grain input pipelines: named components mixed by weight, per-process batches.

Each component is a random-access source (the shapes world, image folders, WebDataset shards,
ArrayRecord, TFDS: `SOURCES`) with the recipe's preprocessing for that component. The training
stream (`TrainStream`) is a function of the seed and a position alone, the same for any worker
count and any `train.steps`, and its checkpointed state is a few integers. Every record carries
`_component` (its component's index, sorted by name) so recipes can report per-component losses
and tests can check the mixing shares.
"""

from __future__ import annotations

import collections
import json
import logging
import zlib
from typing import Callable

import grain
import jax
import numpy as np

from mmjax.config import ConfigError
from mmjax.data import shapes, sources
from mmjax.eval import shapes_eval

log = logging.getLogger("mmjax")


class InMemory:
    """A random-access source read once into memory (`component.cache=True`)."""

    def __init__(self, source):
        self.records = [source[i] for i in range(len(source))]
        self.name = repr(source)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx):
        return self.records[idx]

    def __repr__(self) -> str:
        return f"InMemory({self.name})"


def world_seed(comp) -> int:
    """The shapes world a component reads (`seed`, default 0; not the run's `config.seed`): scorers
    that rebuild a record's scene from its index must use the same one."""
    return int(comp.get("seed", 0))


def _shapes(comp, image_size: int):
    return shapes.ShapesSource(
        split=comp.split,
        view=comp.view,
        image_size=image_size,
        num_records=comp.get("num_records") or None,
        seed=world_seed(comp),
    )


def _geneval(comp, image_size: int):
    return shapes_eval.PromptSource(comp.get("prompts_per_task", 8), comp.get("samples_per_prompt", 4))


# component.source -> (component config, image size) -> random-access source
SOURCES = {
    "shapes": _shapes,
    "geneval": _geneval,
    "image_folder": sources.ImageFolder,
    "webdataset": sources.WebDataset,
    "array_record": sources.ArrayRecord,
    "tfds": sources.Tfds,
}


def make_source(comp, image_size: int, cache: bool = True):
    """The random-access source a component config names (`cache`: honour `comp.cache`)."""
    if comp.source not in SOURCES:
        raise ConfigError(f"data source {comp.source!r} is not available; available: {', '.join(SOURCES)}")
    source = SOURCES[comp.source](comp, image_size)
    return InMemory(source) if cache and comp.get("cache") else source


class _Interleave:
    """Deterministic weighted interleave of components (grain's mixing rule): the component of
    mixed element k and its position there, and how many of the first k elements each component
    gave, in closed form (so a stream can move to new weights without replaying it)."""

    def __init__(self, weights: list[float]):
        self.p = [max(1, round(1000 * w / min(weights))) for w in weights]

    def counts(self, k: int) -> list[int]:
        out, remaining = [], sum(self.p)
        for p in self.p:
            rest = k * (remaining - p) // remaining
            out.append(k - rest)
            k, remaining = rest, remaining - p
        return out

    def pick(self, k: int) -> tuple[int, int]:
        """(component, position in it) of mixed element k: `counts` at k and k + 1 in one pass,
        the first component whose count moves."""
        a, b, remaining = k, k + 1, sum(self.p)
        for i, p in enumerate(self.p):
            ra, rb = a * (remaining - p) // remaining, b * (remaining - p) // remaining
            if a - ra != b - rb:
                return i, a - ra
            a, b, remaining = ra, rb, remaining - p
        raise AssertionError("unreachable: some component gives every element")


class _Mixed:
    """Mixed element k of one segment of the stream: its component's next record, preprocessed
    (picklable: this is what grain's worker processes run). Skipped records pass through."""

    def __init__(self, components, preprocess, weights, starts):
        self.components, self.preprocess = components, preprocess
        self.interleave, self.starts = _Interleave(weights), starts

    def __call__(self, k):
        i, position = self.interleave.pick(int(k))
        source, order, per_epoch = self.components[i]
        at = self.starts[i] + position
        idx, epoch = int(order[at]), at // per_epoch
        # sources with random augmentation draw it per (record, epoch): a new crop every epoch
        record = source.read(idx, epoch) if hasattr(source, "read") else source[idx]
        if "_skip" not in record:
            record = {**self.preprocess[i](record), "_component": np.int32(i)}
        return {**record, "_index": np.int64(k)}


class _Chunk:
    def __init__(self, mixed: _Mixed, start: int, size: int):
        self.mixed, self.start, self.size = mixed, start, size

    def __call__(self, k):
        first = self.start + int(k) * self.size
        return [self.mixed(i) for i in range(first, first + self.size)]


class _Unchunk(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 20

    def flat_map(self, chunk):
        return chunk


def _component_seed(seed: int, name: str) -> int:  # by name: adding a component moves no other
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


class _Shard:
    """One data shard's stream: each component's records `shard::num_shards`, shuffled with a new
    permutation every epoch and repeated for ever, interleaved by weight, preprocessed (in grain
    workers, which return elements in index order), then skips dropped, packing and batching."""

    def __init__(self, stream: "TrainStream", shard: int):
        self.stream, self.shard = stream, shard
        self.components = [self._component(n) for n in stream.names]
        self.state = {
            "weights": dict(stream.weights),
            "start": dict.fromkeys(stream.names, 0),
            "next": 0,
            "seen": 0,
            "skipped": {},
        }
        self._it = None

    def _component(self, name: str) -> tuple:
        """(source, this shard's order of its indices: shuffled every epoch and repeated for ever,
        the indices per epoch)."""
        st = self.stream
        comp = st.config.data.components[name]
        # worker processes each get a copy of the pipeline: no in-memory cache there
        source = make_source(comp, st.config.data.image_size, cache=st.num_workers == 0)
        ds = grain.MapDataset.range(len(source))[self.shard :: st.num_shards]
        if len(ds) == 0:
            raise ConfigError(
                f"data.components.{name} has {len(source)} records, fewer than the {st.num_shards} data "
                "shards (data.shards, default: the process count); every shard needs at least one"
            )
        epoch = ds.shuffle(seed=_component_seed(st.config.seed + 7919 * self.shard, name))
        return source, epoch.repeat(), len(ds)

    def rows(self, num_workers: int) -> grain.IterDataset:
        """Examples (or packed rows) from the current position, `_index` (the mixed index) on each."""
        st, weights, start = self.stream, self.state["weights"], self.state["start"]
        mixed = _Mixed(
            self.components, st.preprocess, [weights[n] for n in st.names], [start[n] for n in st.names]
        )
        # workers send chunks of consecutive elements, one IPC round trip each (BENCHMARKS section 3:
        # 16 at a time is fastest here; 32 made grain's workers 3x slower)
        size = min(st.local, 16)
        ds = grain.MapDataset.range(0, 2**62 // size).map(_Chunk(mixed, self.state["next"], size))
        prefetch = st.config.data.prefetch
        it = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=max(prefetch, 1), prefetch_buffer_size=prefetch)
        )
        if num_workers > 0:
            it = it.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
            )
        it = grain.experimental.FlatMapIterDataset(it, _Unchunk()).filter(self._keep)
        if not st.packing:
            return it
        packed = grain.experimental.FirstFitPackIterDataset(
            it,
            length_struct=st.packing,
            num_packing_bins=st.local,
            shuffle_bins=False,
            meta_features=("_index", "_component"),
        )
        return packed.map(_last_index)

    def _keep(self, record) -> bool:
        self.state["seen"] += 1
        reason = record.get("_skip")
        if reason is None and any(len(record[f]) > n for f, n in self.stream.packing.items()):
            reason = "longer than a packed row"
        if reason is None:
            return True
        skipped = self.state["skipped"]
        skipped[reason] = skipped.get(reason, 0) + 1
        return False

    def batch(self, num_workers: int, advance: bool = True) -> dict:
        if not advance:  # a look ahead: it counts nothing either
            counts = json.dumps(self.state)
            try:
                return next(iter(self.rows(0).batch(self.stream.local, drop_remainder=True)))
            finally:
                self.state = json.loads(counts)
        if self._it is None:
            self._it = iter(self.rows(num_workers).batch(self.stream.local, drop_remainder=True))
        batch = next(self._it)
        self.state["next"] = int(batch["_index"].max()) + 1  # a batch is a contiguous run
        return batch

    def restore(self, saved: dict):
        now = self.stream.weights
        if saved["weights"] != now:  # a new segment: every component where the old one left it
            old = sorted(saved["weights"])
            done = _Interleave([saved["weights"][n] for n in old]).counts(saved["next"])
            at = {n: saved["start"][n] + c for n, c in zip(old, done)}
            saved = {**saved, "weights": dict(now), "start": {n: at.get(n, 0) for n in now}, "next": 0}
        self.state, self._it = saved, None


class TrainStream:
    """This process's training batches: an infinite, checkpointable iterator whose batches are a
    function of the config's seed, components and weights and a position, nothing else: not of
    `train.steps`, the worker count or the process count.

    The stream is cut into `data.shards` shards (default: the process count when the run
    started), each a `_Shard` over every component's records `shard::shards`, so every process
    reads every component in its share; a process reads its shards' batches of
    global_batch / shards rows and concatenates them (one process with `data.shards=N` sees the
    global batches of N processes). Packing rounds and skips happen per shard, after the
    workers.

    State (JSON): per shard, the segment's weights and each component's start position, the next
    mixed index, and the records seen and skipped. Every process saves its own shards; a restore
    reads all of them (checkpoint.py), so a run resumes on any process count that divides the
    shard count. Restored with the same components and weights it continues exactly; with other
    weights or components, every component keeps its position (a new one starts at 0, a dropped
    one is left) and the new weights hold from there.
    """

    def __init__(self, config, preprocess: Callable[[str], Callable], packing=None, num_workers: int = 0):
        self.config, self.packing, self.num_workers = config, dict(packing or {}), num_workers
        self.names = sorted(config.data.components)
        self.weights = {n: float(config.data.components[n].weight) for n in self.names}
        self.preprocess = [preprocess(n) for n in self.names]
        self._shard_into(config.data.get("shards") or jax.process_count())

    def _shard_into(self, num_shards: int):
        procs, gb = jax.process_count(), self.config.data.global_batch_size
        if num_shards % procs or gb % num_shards:
            raise DataError(
                f"{num_shards} data shards cannot be split over {procs} processes with global batch {gb}: "
                f"the shard count must be a multiple of the process count and divide the global batch"
            )
        self.num_shards, self.local = num_shards, gb // num_shards
        per = num_shards // procs
        self.shards = [
            _Shard(self, s) for s in range(jax.process_index() * per, (jax.process_index() + 1) * per)
        ]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = _concat([sh.batch(self.num_workers) for sh in self.shards])
        self._check_skips()
        return batch

    def first_batch(self) -> dict:
        """A batch from the current position (no workers; this stream does not advance)."""
        return _concat([sh.batch(0, advance=False) for sh in self.shards])

    def rows(self, num_workers: int) -> grain.IterDataset:
        return self.shards[0].rows(num_workers)

    def _totals(self) -> tuple[int, int, dict]:
        seen, reasons = 0, collections.Counter()
        for sh in self.shards:
            seen += sh.state["seen"]
            reasons.update(sh.state["skipped"])
        return seen, sum(reasons.values()), dict(reasons)

    def _check_skips(self):
        seen, skipped, reasons = self._totals()
        limit = self.config.data.max_skip_rate
        if seen >= 100 and skipped > limit * seen:
            raise DataError(
                f"{skipped} of {seen} records were skipped ({reasons}), more than data.max_skip_rate={limit}; "
                "check the data with `mmjax data inspect PATH`, or raise the limit"
            )

    def metrics(self) -> dict:
        seen, skipped, _ = self._totals()
        return {"data/skipped": skipped, "data/skip_rate": skipped / max(seen, 1)}

    # the iterator protocol of grain's Orbax handler (grain.checkpoint.CheckpointSave)
    def get_state(self) -> bytes:
        shards = {str(sh.shard): sh.state for sh in self.shards}
        return json.dumps({"num_shards": self.num_shards, "shards": shards}, sort_keys=True).encode()

    def set_state(self, raw: bytes):
        """Restores from one process's state or from all processes' states merged (the
        checkpoint's restore gives the merged one)."""
        saved = json.loads(raw)
        if saved["num_shards"] != self.num_shards:
            if self.config.data.get("shards"):
                raise DataError(
                    f"this checkpoint's data stream has {saved['num_shards']} shards and data.shards="
                    f"{self.num_shards}; resume with data.shards={saved['num_shards']} (or 0: the saved count)"
                )
            self._shard_into(saved["num_shards"])
        changed = False
        for sh in self.shards:
            if str(sh.shard) not in saved["shards"]:
                raise DataError(f"data shard {sh.shard} is missing from the checkpoint's data state")
            state = saved["shards"][str(sh.shard)]
            changed |= state["weights"] != self.weights
            sh.restore(state)
        if changed:
            log.info("data mixture changed on resume: components keep their positions; now %s", self.weights)

    def start_prefetch(self):
        pass


def merge_states(states: list[str | bytes]) -> bytes:
    """The states of several processes' streams as one (what any process count restores from)."""
    loaded = [json.loads(s) for s in states]
    if len({st["num_shards"] for st in loaded}) != 1:
        raise DataError("the data states to merge come from streams with different shard counts")
    shards = {k: v for st in loaded for k, v in st["shards"].items()}
    return json.dumps({"num_shards": loaded[0]["num_shards"], "shards": shards}, sort_keys=True).encode()


def _concat(batches: list[dict]) -> dict:
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    out.pop("_index")
    return out


def _last_index(row: dict) -> dict:
    row = dict(row)
    row.pop("_component")
    row["_index"] = np.int64(max(row["_index"]))
    return row


class DataError(RuntimeError):
    """The data stream cannot go on as configured (too many bad records, a foreign state)."""


def train_dataset(
    config, preprocess: Callable[[str], Callable], packing=None, num_workers: int = 0
) -> TrainStream:
    """`config`'s training stream for this process (see TrainStream). `packing` ({feature:
    length}, from the recipe) packs examples first-fit into rows of fixed length (grain's
    FirstFitPackIterDataset): no example is split, and each packed feature gains
    `<feature>_segment_ids` (1, 2, ... per example, 0 = padding) and `<feature>_positions`."""
    return TrainStream(config, preprocess, packing, num_workers)


def example_row(config, preprocess: Callable[[str], Callable], packing: dict | None = None) -> dict:
    """One training row (no batch axis): the shapes and dtypes of every batch, without drawing a
    whole batch (for compile checks)."""
    row = next(iter(TrainStream(config, preprocess, packing).rows(0)))
    row.pop("_index")
    return row


def first_batch(ds: TrainStream) -> dict:
    """One batch, to read shapes and dtypes from (does not advance the stream)."""
    return ds.first_batch()


class _UnlessSkipped:
    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, record):
        return record if "_skip" in record else self.fn(record)


def eval_dataset(spec, image_size: int, preprocess: Callable) -> grain.IterDataset:
    """A finite, unshuffled evaluation stream: `spec.num_examples` examples in global batches
    (skipped records dropped: a source with bad records gives fewer batches)."""
    source = make_source(spec, image_size)
    n = min(spec.num_examples, len(source))
    n -= n % spec.batch_size  # whole batches (config validation checks num_examples itself)
    ds = grain.MapDataset.source(source)[:n].map(_UnlessSkipped(preprocess))
    ds = ds[jax.process_index() :: jax.process_count()].to_iter_dataset().filter(sources.keep)
    return ds.batch(spec.batch_size // jax.process_count(), drop_remainder=True)
