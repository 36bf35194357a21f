"""Multi-stage runs: a pipeline config (config.pipeline) runs its stages in order, each into
WORKDIR/<stage>, each starting from (or holding frozen) an earlier stage's export.

A stage is finished when WORKDIR/<stage>/stage.json exists: it is written after the stage trained,
evaluated and wrote the exports later stages need, so a rerun skips finished stages, resumes the
interrupted one from its checkpoints and goes on; killed anywhere, the pipeline ends as it would
have straight through.
"""

from __future__ import annotations

import json
import logging

import jax
from jax.experimental import multihost_utils

from mmjax.paths import resolve
from mmjax.train import trainer as trainer_lib

log = logging.getLogger("mmjax")
MARKER = "stage.json"


def is_pipeline(config) -> bool:
    return "stages" in config


def parts(config) -> list[tuple[str, object]]:
    """(name, config) of every stage of a pipeline, in order; [("", config)] for a single run."""
    return [(n, config[n]) for n in config.stages] if is_pipeline(config) else [("", config)]


def _export_dir(workdir, source: str) -> tuple[str, str]:
    """(folder, part) of the export that `source` ("stage" or "stage:part") names."""
    stage, _, part = source.partition(":")
    return str(resolve(workdir) / stage / ("export" + (f"_{part}" if part else ""))), part


def _open_links(pipeline, name: str):
    """Stage `name`'s links whose entry has no path of its own (a path set in the config wins)."""
    for key, source in pipeline.links[name]:
        section, _, entry = key.partition(".")
        if not pipeline[name][section][entry].path:
            yield key, source


def needed(pipeline, name: str) -> bool:
    """Whether stage `name` runs: the last stage, one no later stage links to, or one a later stage
    still needs (a stage whose every consumer was given its own weights is skipped)."""
    later = pipeline.stages[pipeline.stages.index(name) + 1 :]
    sources = [s.partition(":")[0] for n in later for _, s in pipeline.links[n]]
    if not later or name not in sources:
        return True
    return any(s.partition(":")[0] == name for n in later for _, s in _open_links(pipeline, n))


def stage_config(pipeline, name: str, workdir):
    """The config of stage `name`, its links pointing at the earlier stages' exports."""
    config = pipeline[name].copy_and_resolve_references()
    with config.unlocked():
        for key, source in _open_links(pipeline, name):
            section, _, entry = key.partition(".")
            config[section][entry].path = _export_dir(workdir, source)[0]
    return config


def last(config, workdir):
    """(config, workdir) that eval / sample / export use: a pipeline's last stage."""
    if not is_pipeline(config):
        return config, workdir
    name = config.stages[-1]
    return stage_config(config, name, workdir), str(resolve(workdir) / name)


def train(config, workdir) -> dict:
    """Trains a config, or every stage of a pipeline; returns the final metrics (per stage)."""
    if not is_pipeline(config):
        return trainer_lib.train(config, workdir)
    results = {}
    for i, name in enumerate(config.stages):
        sub = resolve(workdir) / name
        if not needed(config, name):
            log.info("stage %s is not needed: every stage after it has its weights from the config", name)
            continue
        if (sub / MARKER).exists():
            results[name] = json.loads((sub / MARKER).read_text())
            log.info("stage %s is finished (%s); skipping it", name, sub / MARKER)
        else:
            cfg = stage_config(config, name, workdir)
            results[name] = trainer_lib.train(cfg, str(sub))
            wanted = {src for later in config.stages[i + 1 :] for _, src in _open_links(config, later)}
            for source in sorted(s for s in wanted if s.partition(":")[0] == name):
                dst, part = _export_dir(workdir, source)
                trainer_lib.Trainer(cfg, str(sub)).export(dst, part)
            if jax.process_index() == 0:
                (sub / MARKER).write_text(json.dumps(results[name], indent=1))
            multihost_utils.sync_global_devices(f"mmjax.stages:{name}")
        if jax.process_index() == 0:
            print(
                f"stage {name}: "
                + json.dumps(
                    {k: round(v, 4) for k, v in results[name].items() if isinstance(v, float) and "/" in k}
                ),
                flush=True,
            )
    return results
