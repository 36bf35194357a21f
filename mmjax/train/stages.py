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


def _export_dir(workdir, source: str) -> tuple[str, str]:
    """(folder, part) of the export that `source` ("stage" or "stage:part") names."""
    stage, _, part = source.partition(":")
    return str(resolve(workdir) / stage / ("export" + (f"_{part}" if part else ""))), part


def stage_config(pipeline, name: str, workdir):
    """The config of stage `name`, its links pointing at the earlier stages' exports."""
    config = pipeline[name].copy_and_resolve_references()
    with config.unlocked():
        for key, source in pipeline.links[name]:
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
        if (sub / MARKER).exists():
            results[name] = json.loads((sub / MARKER).read_text())
            log.info("stage %s is finished (%s); skipping it", name, sub / MARKER)
        else:
            cfg = stage_config(config, name, workdir)
            results[name] = trainer_lib.train(cfg, str(sub))
            needed = {src for later in config.stages[i + 1 :] for _, src in config.links[later]}
            for source in sorted(s for s in needed if s.partition(":")[0] == name):
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
