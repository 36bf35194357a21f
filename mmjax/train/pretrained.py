"""Pretrained weights: what `mmjax convert hf-import` writes and `config.init` names.

A weights folder holds `params/` (an Orbax PyTree checkpoint of the parameter tree, written
atomically) and `mmjax.json` (what the weights are: `kind`, the mmjax module kwargs under
`model`, and where they came from). A config loads one or more of them into a subtree of
its own parameters:

    c.init.llm = dict(path="/ckpt/tinyllama", into="llm", skip="")

An entry with an empty path is skipped, so a config can declare what it can start from and
the command line fills it in (`--config.init.llm.path=/ckpt/tinyllama`).

`into` is the '/'-separated parameter prefix ('' = the whole tree); `skip` is a regex of
loaded names to leave at their fresh initialisation (e.g. a new classifier head). Every
parameter under `into` must be covered, and shapes must agree: a mismatch names the
parameter and both shapes.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmjax import parallel
from mmjax.config import ConfigError

META = "mmjax.json"


def save(dst: str, params, meta: dict) -> None:
    """Writes `params` (a nested dict of arrays) and `meta` to the folder `dst`."""
    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    host = jax.tree.map(np.asarray, params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(dst, "params"), host, force=True)
    tmp = os.path.join(dst, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(dst, META))


def read_meta(path: str) -> dict:
    file = os.path.join(os.path.expanduser(path), META)
    if not os.path.exists(file):
        raise ConfigError(
            f"{path} is not an mmjax weights folder (no {META}); make one with "
            f"`mmjax convert hf-import SRC {path}`"
        )
    with open(file) as f:
        return json.load(f)


def load(path: str) -> tuple[dict, dict]:
    """(params as a nested dict of numpy arrays, meta) from a weights folder."""
    meta = read_meta(path)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(os.path.abspath(os.path.expanduser(path)), "params"))
    return jax.tree.map(np.asarray, params), meta


def overlay(params, name: str, spec) -> dict:
    """The weights of `spec` (path, into, skip) as a flat {full name: numpy array} of the
    leaves of `params` (abstract is fine) they replace, checked against their shapes."""
    loaded, _ = load(spec.path)
    into = spec.get("into", "").strip("/")
    prefix = into + "/" if into else ""
    skip = re.compile(spec.skip) if spec.get("skip") else None
    skipped = lambda n: skip is not None and skip.search(n) is not None  # noqa: E731 (loaded-side names)
    target = {n[len(prefix) :]: a for n, a in parallel.flat(params).items() if n.startswith(prefix)}
    if not target:
        raise ConfigError(f"init.{name}.into={into!r} matches no parameter of this model")
    out = {}
    for n, v in parallel.flat(loaded).items():
        if skipped(n):
            continue
        if n not in target:
            raise ConfigError(
                f"init.{name}: {spec.path} has {n!r} but the model has no {prefix + n!r}; check "
                f"init.{name}.into or add it to init.{name}.skip"
            )
        if tuple(v.shape) != tuple(target[n].shape):
            raise ConfigError(
                f"init.{name}: {prefix + n!r} is {tuple(v.shape)} in {spec.path} but {tuple(target[n].shape)} "
                f"in the model; the config's model must match the weights (see {META})"
            )
        out[prefix + n] = v
    missing = [prefix + n for n in target if prefix + n not in out and not skipped(n)]
    if missing:
        raise ConfigError(
            f"init.{name}: {spec.path} lacks {len(missing)} parameters under {into!r}, e.g. {missing[:3]}; "
            f"add them to init.{name}.skip to keep them freshly initialised"
        )
    return out
