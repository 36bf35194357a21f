"""Grain input pipelines: named components mixed by weight, per-process batches.

Each component is a random-access source (so far the shapes world) with the recipe's
preprocessing for that component. Components are mixed
by weight with `grain.MapDataset.mix`, so the stream is a pure function of the index:
deterministic across worker counts, and its iterator state is a few integers that Orbax
checkpoints with the model. Every record carries `_component` (its component's index) so
recipes can report per-component losses and tests can check the mixing shares.
"""

from __future__ import annotations

import math
from typing import Callable

import grain
import jax
import numpy as np

from mmjax.config import ConfigError
from mmjax.data import shapes, sources
from mmjax.eval import shapes_eval


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


def _shapes(comp, image_size: int):
    return shapes.ShapesSource(
        split=comp.split, view=comp.view, image_size=image_size, num_records=comp.get("num_records") or None
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


def make_source(comp, image_size: int):
    """The random-access source a component config names."""
    if comp.source not in SOURCES:
        raise ConfigError(f"data source {comp.source!r} is not available; available: {', '.join(SOURCES)}")
    source = SOURCES[comp.source](comp, image_size)
    return InMemory(source) if comp.get("cache") else source


class _Tag:
    """Adds the component index to a preprocessed record (picklable for grain workers)."""

    def __init__(self, fn: Callable, index: int):
        self.fn, self.index = fn, index

    def __call__(self, record):
        return {**self.fn(record), "_component": np.int32(self.index)}


def mixture(config, preprocess: Callable[[str], Callable], num_examples: int) -> grain.MapDataset:
    """The weighted, shuffled, preprocessed mixture of `config.data.components`.

    `num_examples` is how many mixed examples the run will draw; each component repeats
    for enough epochs (reshuffled every epoch) to supply them.
    """
    names = sorted(config.data.components)
    datasets, weights = [], []
    for i, name in enumerate(names):
        comp = config.data.components[name]
        ds = grain.MapDataset.source(make_source(comp, config.data.image_size))
        epochs = math.ceil(num_examples / len(ds)) + 1
        ds = ds.repeat(epochs).shuffle(seed=config.seed + 1000 * i)
        datasets.append(ds.map(_Tag(preprocess(name), i)))
        weights.append(comp.weight)
    return grain.MapDataset.mix(datasets, weights) if len(datasets) > 1 else datasets[0]


def train_dataset(
    config, preprocess: Callable[[str], Callable], packing: dict | None = None
) -> grain.MapDataset | grain.IterDataset:
    """`train.steps` per-process batches (this process's share of each global batch).

    `packing` ({feature: length}, from the recipe) packs examples first-fit into rows of
    fixed length (grain's FirstFitPackIterDataset): no example is split or dropped, and each
    packed feature gains `<feature>_segment_ids` (1, 2, ... per example, 0 = padding) and
    `<feature>_positions` (restarting per example). The result is then an IterDataset,
    still deterministic and checkpointable.
    """
    steps, local = config.train.steps, config.data.global_batch_size // jax.process_count()
    # a packed row holds up to max(packing) examples: enough epochs for that too
    per_row = max(packing.values()) if packing else 1
    ds = mixture(config, preprocess, steps * config.data.global_batch_size * per_row)
    ds = ds[jax.process_index() :: jax.process_count()]
    if not packing:
        return ds.batch(local, drop_remainder=True)[:steps]
    rows = grain.experimental.FirstFitPackIterDataset(
        _iter(ds, config.data.prefetch),
        length_struct=dict(packing),
        num_packing_bins=local,
        shuffle_bins=False,
    )
    return rows.batch(local, drop_remainder=True)


def example_row(config, preprocess: Callable[[str], Callable], packing: dict | None = None) -> dict:
    """One training row (no batch axis) from the first examples of the mixture: the shapes and
    dtypes of every batch, without drawing a whole batch (for compile checks)."""
    ds = mixture(config, preprocess, 1)
    if not packing:
        return ds[0]
    rows = grain.experimental.FirstFitPackIterDataset(
        _iter(ds, 0), length_struct=dict(packing), num_packing_bins=1, shuffle_bins=False
    )
    return next(iter(rows))


def first_batch(ds: grain.MapDataset | grain.IterDataset) -> dict:
    """One batch, to read shapes and dtypes from (does not advance any training iterator)."""
    return ds[0] if isinstance(ds, grain.MapDataset) else next(iter(ds))


def _iter(ds: grain.MapDataset, prefetch: int) -> grain.IterDataset:
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=max(prefetch, 1), prefetch_buffer_size=prefetch))


def to_iter(
    ds: grain.MapDataset | grain.IterDataset, num_workers: int, prefetch: int = 2
) -> grain.IterDataset:
    it = _iter(ds, prefetch) if isinstance(ds, grain.MapDataset) else ds
    if num_workers > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
        )
    return it


def eval_dataset(spec, image_size: int, preprocess: Callable) -> grain.MapDataset:
    """A finite, unshuffled evaluation stream: `spec.num_examples` examples in global batches."""
    source = make_source(spec, image_size)
    n = min(spec.num_examples, len(source))
    n -= n % spec.batch_size  # whole batches (config validation checks num_examples itself)
    ds = grain.MapDataset.source(source)[:n].map(preprocess)
    ds = ds[jax.process_index() :: jax.process_count()]
    return ds.batch(spec.batch_size // jax.process_count(), drop_remainder=True)
