"""Checkpoints: one Orbax CheckpointManager per run, holding the train state, the Grain
data-iterator state, the config (JSON) and what the run was started with (JSON: the frozen
models' folders and content fingerprints).

Saves are asynchronous and atomic (Orbax writes to a temporary folder and commits by
renaming), so a killed process never leaves a half-written checkpoint that a restart
would read. Restores take the target shardings of the *current* mesh, so a run saved on
one mesh shape continues on another. The workdir may be a bucket (`gs://...`).
"""

from __future__ import annotations

import json
import re

import grain
import jax
import orbax.checkpoint as ocp

from mmjax.data.pipeline import merge_states
from mmjax.paths import resolve


class Checkpointer:
    def __init__(self, workdir, keep: int, keep_period: int = 0, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_period or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(resolve(workdir) / "checkpoints", options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state,
        data_iter=None,
        config: dict | None = None,
        run: dict | None = None,
        force=False,
    ) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        if run is not None:
            items["run"] = ocp.args.JsonSave(run)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, data_iter=None, step: int | None = None):
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs); the data
        stream from every process's saved file (its shards may now live on another process)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        if data_iter is not None:
            data_iter.set_state(self._data_state(step))
        return restored["state"], step

    def _data_state(self, step: int) -> bytes:
        """The saved states of all processes (grain's handler writes `process_I-of-N.json` each), merged."""
        folder = self.manager.directory / str(step) / "data"
        files = sorted(folder.glob("process_*-of-*.json"))
        counts = {int(re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name).group(1)) for f in files}
        if len(counts) != 1 or len(files) != next(iter(counts)):
            raise RuntimeError(f"{folder} holds {[f.name for f in files]}: not one file per saving process")
        return merge_states([f.read_text() for f in files])

    def run_info(self, step: int | None = None) -> dict:
        """The `run` JSON saved with a checkpoint ({} for checkpoints without one)."""
        step = self.latest_step() if step is None else step
        file = self.manager.directory / str(step) / "run" / "metadata"  # JsonSave's file
        return json.loads(file.read_text()) if file.exists() else {}

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings
    )
