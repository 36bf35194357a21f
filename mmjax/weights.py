"""Weights folders: what `mmjax convert hf-import` and `mmjax export` write, and what `config.init`
(weights to start from) and `config.frozen` (models held fixed) name.

A weights folder holds `params/` (an Orbax PyTree checkpoint of the parameter tree), `mmjax.json`
(what the weights are: `kind`, the mmjax module kwargs under `model`, where they came from) and,
when the model has one, `tokenizer/` (a Hugging Face tokenizer folder). `mmjax.json` is written
last, so a folder whose writer died is never taken for a finished one.

Loading is planned from the stored metadata before any array is read (`plan`), then each process
reads only its shards of the arrays it needs, straight onto the target shardings (`read`), and a
jitted function puts them in place (`assemble`). A plan maps a model's parameter names (under a
prefix `into`) to stored names and converts on the way:
- layouts: `x/block_{i}/...` (one subtree per layer) <-> `x/blocks/...` (scanned, leading layer axis);
- vocabulary growth: an axis with the logical name `vocab` may be longer in the model (tokens a
  recipe added); the new rows start at the mean of the stored rows plus small noise (as HF's
  `resize_token_embeddings`);
- dtype: arrays are read in the model's dtype (a bf16 frozen model is never held in fp32).
`skip` is a regex of names (folder-relative) left at their fresh initialisation. Everything else
must match by name and shape: a mismatch names the parameter and both shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import tree
from mmjax.paths import resolve as path
from mmjax.config import ConfigError
from mmjax.models.llm import grow_rows

META = "mmjax.json"
log = logging.getLogger("mmjax")


# ---- writing and reading whole folders ------------------------------------------------------------
def save(dst, params, meta: dict, tokenizer=None) -> None:
    """Writes `params` (a nested dict of numpy or jax arrays, which may be spread over several
    processes: every process calls this and writes its own shards) and `meta` to the folder `dst`."""
    dst, lead = path(dst), jax.process_index() == 0
    if lead:
        dst.mkdir(parents=True, exist_ok=True)
        (dst / META).unlink(missing_ok=True)  # the folder is unfinished until the new meta lands
    multihost_utils.sync_global_devices("mmjax.weights.save:start")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(dst / "params", params, force=True)
    if lead:
        if tokenizer is not None:
            _save_tokenizer(tokenizer, dst / "tokenizer")
        tmp = dst / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(dst / META)
    multihost_utils.sync_global_devices("mmjax.weights.save:done")


def _save_tokenizer(tokenizer, dst: epath.Path) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes local files; copy them over
        tokenizer.save_pretrained(tmp)
        dst.mkdir(parents=True, exist_ok=True)
        for f in epath.Path(tmp).iterdir():
            (dst / f.name).write_bytes(f.read_bytes())


def read_meta(p) -> dict:
    file = path(p) / META
    if not file.exists():
        raise ConfigError(
            f"{p} is not an mmjax weights folder (no {META}); make one with `mmjax convert hf-import SRC {p}` "
            f"or `mmjax export`"
        )
    return json.loads(file.read_text())


def tokenizer_path(p):
    """The folder's tokenizer (saved with the weights), or None."""
    t = path(p) / "tokenizer"
    return t if t.exists() else None


def stored(p) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of the folder's arrays, from its metadata (nothing is read)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path(p) / "params").item_metadata.tree
    return {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in tree.flat(meta).items()}


def load(p) -> tuple[dict, dict]:
    """(params as a nested dict of host numpy arrays, meta): for one process (interop, notebooks)."""
    meta = read_meta(p)
    host = tree.unflat({n: ocp.RestoreArgs(restore_type=np.ndarray) for n in stored(p)})
    with ocp.PyTreeCheckpointer() as ckptr:  # host arrays, on however many processes they were written
        params = ckptr.restore(path(p) / "params", args=ocp.args.PyTreeRestore(restore_args=host))
    return jax.tree.map(np.asarray, params), meta


# ---- loading into a model ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """How one model parameter is made from stored arrays."""

    names: tuple[str, ...]  # stored names; several are stacked on a new leading (layer) axis
    index: int | None = None  # take row `index` of a stored stacked array
    grow: int | None = None  # the axis (vocabulary) that the model has longer than the folder


_BLOCKS = re.compile(r"(.*/)?blocks/(.*)")
_BLOCK_I = re.compile(r"(.*/)?block_(\d+)/(.*)")


def _source(rel: str, shape: tuple[int, ...], have: dict) -> Source | None:
    if rel in have:
        return Source((rel,))
    if m := _BLOCKS.fullmatch(rel):  # scanned model, per-layer folder
        names = tuple(f"{m[1] or ''}block_{i}/{m[2]}" for i in range(shape[0]))
        if all(n in have for n in names):
            return Source(names)
    if m := _BLOCK_I.fullmatch(rel):  # per-layer model, scanned folder
        name = f"{m[1] or ''}blocks/{m[3]}"
        if name in have:
            return Source((name,), index=int(m[2]))
    return None


def _stored_shape(src: Source, have: dict) -> tuple[int, ...]:
    shape = have[src.names[0]][0]
    if len(src.names) > 1:
        return (len(src.names), *shape)
    return shape[1:] if src.index is not None else shape


def plan(entry: str, spec, targets: dict, logical: dict) -> dict[str, Source]:
    """{full model name: Source} for the weights folder `spec.path` loaded under `spec.into`.

    `targets`: {name: array or ShapeDtypeStruct} of the model; `logical`: {name: logical
    PartitionSpec}. Raises ConfigError naming what does not fit."""
    have = stored(spec.path)
    into = spec.get("into", "").strip("/")
    prefix = into + "/" if into else ""
    skip = re.compile(spec.skip) if spec.get("skip") else None
    skipped = lambda n: skip is not None and skip.search(n) is not None  # noqa: E731
    here = {n[len(prefix) :]: n for n in tree.under(targets, into)}
    if not here:
        raise ConfigError(f"{entry}.into={into!r} matches no parameter of this model")
    out, missing = {}, []
    for rel, full in here.items():
        if skipped(rel):
            continue
        want = tuple(targets[full].shape)
        src = _source(rel, want, have)
        if src is None:
            missing.append(full)
            continue
        got = _stored_shape(src, have)
        names = tuple(logical.get(full) or ())
        diff = [a for a in range(len(want)) if len(got) != len(want) or got[a] != want[a]]
        if (
            len(got) == len(want)
            and len(diff) == 1
            and _axis_name(names, diff[0]) == "vocab"
            and got[diff[0]] < want[diff[0]]
        ):
            src = dataclasses.replace(src, grow=diff[0])
            log.info(
                "%s: %s grows from %d to %d rows (vocabulary resize)",
                entry,
                full,
                got[diff[0]],
                want[diff[0]],
            )
        elif diff:
            raise ConfigError(
                f"{entry}: {full!r} is {got} in {spec.path} but {want} in the model; the config's model must "
                f"match the weights (see {spec.path}/{META})"
            )
        out[full] = src
    used = {n for s in out.values() for n in s.names}
    extra = sorted(n for n in have if n not in used and not skipped(n))
    if extra:
        raise ConfigError(
            f"{entry}: {spec.path} has {extra[0]!r} but the model has no {prefix + extra[0]!r} ({len(extra)} such); "
            f"check {entry}.into or add them to {entry}.skip"
        )
    if missing:
        raise ConfigError(
            f"{entry}: {spec.path} lacks {len(missing)} parameters under {into!r}, e.g. {missing[:3]}; "
            f"add them to {entry}.skip to keep them freshly initialised"
        )
    return out


def _axis_name(names: tuple, axis: int):
    return names[axis] if axis < len(names) else None


def read(p, sources: dict[str, Source], shardings: dict[str, NamedSharding], dtypes: dict) -> dict:
    """The stored arrays that `sources` name, as global arrays sharded like their targets (each
    process reads its own shards), in the targets' dtypes: {stored name: jax.Array}."""
    have, item = stored(p), {}
    for full, src in sources.items():
        sh = shardings[full]
        spec = list(sh.spec) + [None] * (len(_stored_shape(src, have)) - len(sh.spec))
        if src.grow is not None:  # the stored length may not divide the mesh axis
            spec[src.grow] = None
        if len(src.names) > 1:
            spec = spec[1:]
        if src.index is not None:
            spec = [None, *spec]
        for n in src.names:
            item[n] = jax.ShapeDtypeStruct(
                have[n][0], dtypes[full], sharding=NamedSharding(sh.mesh, P(*spec))
            )
    nested = tree.unflat(item)
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            path(p) / "params",
            args=ocp.args.PyTreeRestore(
                item=nested,
                restore_args=ocp.checkpoint_utils.construct_restore_args(nested),
                partial_restore=True,
            ),
        )
    return tree.flat(restored)


def assemble(raw: dict, sources: dict[str, Source], targets: dict, rng: jax.Array) -> dict:
    """{full name: array} from what `read` returned (traceable: run it inside jit)."""
    out = {}
    for i, (full, src) in enumerate(sorted(sources.items())):
        x = jnp.stack([raw[n] for n in src.names]) if len(src.names) > 1 else raw[src.names[0]]
        if src.index is not None:
            x = x[src.index]
        if src.grow is not None:
            x = grow_rows(x, src.grow, targets[full].shape[src.grow], jax.random.fold_in(rng, i))
        out[full] = x.astype(targets[full].dtype)
    return out


# ---- fingerprints -----------------------------------------------------------------------------
@jax.jit
def _checksum(x: jax.Array) -> jax.Array:
    """A position-weighted uint32 sum of the array's bits (order-free, so sharding-independent)."""
    bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32, 1: jnp.uint8}[x.dtype.itemsize])
    bits = bits.astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    return jnp.sum(bits * (index * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)


def fingerprint(arrays: dict[str, jax.Array]) -> str:
    """A content fingerprint of named arrays (names, shapes, dtypes and every bit), computed where
    the arrays live; the same on any mesh."""
    sums = {n: _checksum(a) for n, a in sorted(arrays.items())}
    h = hashlib.sha256()
    for n, s in sums.items():
        a = arrays[n]
        h.update(f"{n}:{a.shape}:{a.dtype}:{int(np.asarray(s.addressable_shards[0].data))};".encode())
    return h.hexdigest()[:16]


# ---- models by path ---------------------------------------------------------------------------
def vlm_spec(p):
    """(model config, tokenizer) of a VLM export (`mmjax export` of an MM1 run): how another recipe
    (IOMM's frozen MLLM) builds the model a weights folder holds, without the MM1 recipe."""
    import ml_collections

    from mmjax.data import tokenizer as tok_lib

    meta = read_meta(p)
    if meta.get("kind") != "vlm":
        raise ConfigError(
            f"{p} holds {meta.get('kind')!r} weights, not a VLM export (`mmjax export` of an MM1 run)"
        )
    mc = ml_collections.ConfigDict(meta["model"])
    return mc, tok_lib.load(tokenizer_path(p) or mc.get("tokenizer") or None)


def load_vlm(p):
    """(model, host params, tokenizer) of a VLM export."""
    from mmjax.data import tokenizer as tok_lib
    from mmjax.models import vlm

    mc, tokenizer = vlm_spec(p)
    vocab = mc.llm.get("vocab_size") or len(tokenizer)
    return vlm.build(mc, vocab, tokenizer.convert_tokens_to_ids(tok_lib.IMAGE)), load(p)[0], tokenizer
