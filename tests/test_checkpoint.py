"""Checkpoint retention and atomicity."""

import os

import jax.numpy as jnp

from mmjax.train.checkpoint import Checkpointer


def test_keeps_last_n_and_every_kth(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2, keep_period=4)
    for step in range(1, 11):
        ckpt.save(step, {"w": jnp.full((3,), step, jnp.float32)}, config={"step": step})
    ckpt.wait()
    assert ckpt.manager.all_steps() == [4, 8, 9, 10]
    ckpt.close()


def test_unfinished_save_is_ignored(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=3)
    ckpt.save(1, {"w": jnp.ones(2)})
    ckpt.close()
    # What a save killed half-way leaves behind: a temporary folder, never committed.
    os.makedirs(tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123" / "state")
    ckpt = Checkpointer(str(tmp_path), keep=3)
    assert ckpt.latest_step() == 1
    state, step = ckpt.restore({"w": jnp.zeros(2)})
    assert step == 1 and float(state["w"].sum()) == 2.0
    ckpt.close()
