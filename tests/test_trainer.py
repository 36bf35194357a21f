"""The trainer end to end: sharding equivalence, resume after SIGKILL / SIGTERM,
restoring onto another mesh, the NaN guard, accumulation, freezing, EMA, eval CLI."""

import glob
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, read_metrics, run_mmjax
from mmjax import parallel, tree
from mmjax.data import pipeline
from mmjax.train import checkpoint as ckpt_lib, trainer as trainer_lib

# The tiny config renders and caches 4096 records in every process it starts (seconds each); the runs
# here draw at most 20 x 32, so they render 512 (still several epochs of shuffled data).
FEW = "--config.data.components.shapes.num_records=512"
SHORT = [
    "--config.train.steps=20",
    "--config.train.log_every=1",
    "--config.train.save_every=5",
    "--config.evals={}",
    FEW,
]


def test_sharded_run_matches_one_device_and_shards_params(tmp_path, tiny_config):
    one = run_mmjax(
        "train",
        "--config",
        TINY,
        "--workdir",
        str(tmp_path / "one"),
        "--config.train.steps=8",
        "--config.train.log_every=1",
        FEW,
        devices=1,
    )
    eight = run_mmjax(
        "train",
        "--config",
        TINY,
        "--workdir",
        str(tmp_path / "eight"),
        "--config.train.steps=8",
        "--config.train.log_every=1",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        FEW,
        devices=8,
    )
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "eight")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([a[s]["loss"] for s in a], [b[s]["loss"] for s in a], rtol=2e-5)
    assert a[8]["loss"] != a[1]["loss"]
    assert "compiled train step, per device" in one.stdout + eight.stdout

    # In this process (8 fake devices): the kernels really are split over `fsdp`.
    trainer = trainer_lib.Trainer(tiny_config("mesh.data=2", "mesh.fsdp=4"), str(tmp_path / "x"))
    state = trainer.init_state()
    sharded = [(n, p) for n, p in tree.flat(state.params).items() if "fsdp" in str(p.sharding.spec)]
    assert sharded, "no parameter is sharded over fsdp"
    for name, p in sharded:
        shard = p.addressable_shards[0].data.shape
        assert np.prod(shard) * 4 == p.size, (name, shard, p.shape)
    # optimizer moments shard like their parameters
    mu = [x for x in jax.tree.leaves(state.opt_state) if hasattr(x, "sharding") and x.ndim > 1]
    assert any("fsdp" in str(x.sharding.spec) for x in mu)


@pytest.mark.long
def test_resume_is_bit_identical_after_sigkill_and_sigterm(tmp_path):
    straight = str(tmp_path / "straight")
    run_mmjax("train", "--config", TINY, "--workdir", straight, *SHORT)
    for sig in ("SIGKILL", "SIGTERM"):
        broken = str(tmp_path / sig)
        first = run_mmjax(
            "train",
            "--config",
            TINY,
            "--workdir",
            broken,
            *SHORT,
            "--config.debug.kill_at_step=12",
            f"--config.debug.kill_signal={sig}",
            check=False,
        )
        expected = -signal.SIGKILL if sig == "SIGKILL" else 143
        assert first.returncode == expected, first.stderr[-2000:]
        steps = sorted(int(s) for s in os.listdir(os.path.join(broken, "checkpoints")) if s.isdigit())
        assert steps[-1] == (10 if sig == "SIGKILL" else 12), steps  # SIGTERM saves where it stopped
        run_mmjax("train", "--config", TINY, "--workdir", broken, *SHORT)
        a, b = read_metrics(straight), read_metrics(broken)
        assert sorted(a) == sorted(b) == list(range(1, 21))
        for s in a:  # bit-identical: same data order, same RNG, same arithmetic
            assert a[s]["loss"] == b[s]["loss"], (sig, s, a[s]["loss"], b[s]["loss"])


@pytest.mark.long
def test_restore_onto_another_mesh(tmp_path, tiny_config):
    workdir = str(tmp_path / "run")
    few = FEW.removeprefix("--config.")
    cfg = tiny_config("train.steps=6", "train.save_every=3", "mesh.data=8", "evals.val.num_examples=64", few)
    trainer_lib.train(cfg, workdir)
    cfg = tiny_config(
        "train.steps=10", "train.save_every=3", "mesh.data=2", "mesh.fsdp=4", "evals.val.num_examples=64", few
    )
    trainer = trainer_lib.Trainer(cfg, workdir)
    ckpt = ckpt_lib.Checkpointer(workdir, cfg.train.keep)
    state, step = ckpt.restore(trainer.abstract_state_with_shardings())
    ckpt.close()
    assert step == 6 and int(state.step) == 6
    kernel = next(p for n, p in tree.flat(state.params).items() if "fsdp" in str(p.sharding.spec))
    assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    trainer.fit()  # continues to step 10 on the new mesh
    rows = read_metrics(workdir)
    assert max(rows) == 10 and np.isfinite(rows[10]["loss"])


def _one_step(trainer, state, batch):
    if not hasattr(trainer, "_test_step"):  # compiled once per trainer
        trainer._test_step = jax.jit(trainer.train_step)
    with trainer._context():
        return trainer._test_step(state, {}, batch)


def _batch(trainer):
    if not hasattr(trainer, "_test_batch"):  # the first batch, built once per trainer (512 records rendered)
        config = trainer.config.copy_and_resolve_references()
        config.data.components.shapes.num_records = 512
        trainer._test_batch = pipeline.first_batch(pipeline.train_dataset(config, trainer.recipe.preprocess))
    return parallel.global_batch(trainer._test_batch, trainer.batch_sharding)


def test_nan_guard_skips_and_stops(tmp_path, tiny_config):
    trainer = trainer_lib.Trainer(tiny_config("train.max_bad_steps=1"), str(tmp_path))
    state = trainer.init_state()
    before = jax.tree.map(np.asarray, state.params)
    bad = dict(_batch(trainer))
    bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
    state, metrics = _one_step(trainer, state, bad)
    assert int(metrics["skipped"]) == 1 and int(state.bad_streak) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state.params))
    trainer._check_streak(metrics, 1)  # 1 in a row is allowed
    state, metrics = _one_step(trainer, state, bad)
    with pytest.raises(trainer_lib.TooManyBadSteps, match="max_bad_steps"):
        trainer._check_streak(metrics, 2)
    state, metrics = _one_step(trainer, state, _batch(trainer))  # a good step resets the streak
    assert int(state.bad_streak) == 0 and int(state.bad_total) == 2 and int(metrics["skipped"]) == 0


def test_logged_lr_is_the_applied_lr_after_skipped_steps(tmp_path, tiny_config):
    """optax's schedule counts applied updates only; the logged lr must be that one."""
    trainer = trainer_lib.Trainer(tiny_config("optim.warmup_steps=10"), str(tmp_path))
    state = trainer.init_state()
    bad = dict(_batch(trainer))
    bad["image"] = bad["image"] * jnp.nan
    for _ in range(3):
        state, _ = _one_step(trainer, state, bad)
    state, metrics = _one_step(trainer, state, _batch(trainer))
    counts = {
        int(x) for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if "count" in str(p)
    }
    assert counts == {1}  # one update applied in four steps
    assert float(metrics["lr"]) == pytest.approx(float(trainer.opt.schedule(0)), abs=1e-12)
    assert float(trainer.opt.schedule(3)) > 0  # what state.step would have logged


def test_nan_guard_stops_at_the_exact_step_through_fit(tmp_path):
    workdir = str(tmp_path / "run")
    proc = run_mmjax(
        "train",
        "--config",
        TINY,
        "--workdir",
        workdir,
        "--config.train.steps=40",
        "--config.train.log_every=100",
        "--config.train.save_every=5",
        "--config.train.max_bad_steps=3",
        "--config.debug.nan_from_step=8",
        "--config.evals={}",
        FEW,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "steps 8..11 were non-finite (4 in a row > train.max_bad_steps=3)" in proc.stderr
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps[-1] == 10, steps  # the last save before the stop; none after it
    cfg = trainer_lib.config_lib.load(TINY, ["train.steps=40"])
    state, _, _, step = trainer_lib.Trainer(cfg, workdir).latest()
    assert step == 10 and int(state.bad_streak) == 3
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params))


def test_zero_intervals_mean_off_and_a_profile_is_written(tmp_path):
    workdir = str(tmp_path / "run")
    run_mmjax(
        "train",
        "--config",
        TINY,
        "--workdir",
        workdir,
        "--config.train.steps=3",
        "--config.train.log_every=0",
        "--config.train.save_every=0",
        "--config.evals={}",
        "--config.profile.start_step=2",
        "--config.profile.steps=1",
        FEW,
    )
    assert sorted(read_metrics(workdir)) == [3]
    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3"]


def test_grad_accumulation_matches_full_batch(tmp_path, tiny_config):
    outs = []
    for accum in (1, 4):
        trainer = trainer_lib.Trainer(
            tiny_config(f"train.grad_accum={accum}", "optim.warmup_steps=0", "optim.schedule='constant'"),
            str(tmp_path),
        )
        if accum == 1:  # grad_accum enters neither the initial state nor the data: one init, one batch
            start, batch = trainer.init_state(), _batch(trainer)
        state, metrics = _one_step(trainer, start, batch)
        outs.append((float(metrics["loss"]), float(metrics["grad_norm"]), tree.flat(state.params)))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-4)
    for n in outs[0][2]:
        np.testing.assert_allclose(outs[0][2][n], outs[1][2][n], atol=1e-6)


def test_freezing_groups_and_ema(tmp_path, tiny_config):
    cfg = tiny_config(
        "optim.freeze=('encoder',)",
        "optim.groups=(('head', 0.0),)",
        "train.ema_decay=0.5",
        "optim.warmup_steps=0",
        "optim.schedule='constant'",
    )
    trainer = trainer_lib.Trainer(cfg, str(tmp_path))
    state = trainer.init_state()
    names = tree.flat(state.params)
    frozen = [n for n in names if "encoder" in n]
    assert frozen and not any(n in trainer.opt.trainable for n in frozen)
    opt_keys = {
        getattr(k, "key", None)
        for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        for k in path
    }
    assert not opt_keys & set(frozen), "frozen parameters must have no optimizer state"
    before = {n: np.asarray(v) for n, v in names.items()}
    state, _ = _one_step(trainer, state, _batch(trainer))
    after = tree.flat(state.params)
    for n in frozen:
        np.testing.assert_array_equal(before[n], after[n])
    head = [n for n in after if "head" in n]
    for n in head:  # lr multiplier 0
        np.testing.assert_array_equal(before[n], after[n])
    moved = [n for n in after if n not in frozen and n not in head]
    assert any(not np.array_equal(before[n], after[n]) for n in moved)
    n = moved[0]
    np.testing.assert_allclose(state.ema[n], 0.5 * before[n] + 0.5 * np.asarray(after[n]), atol=1e-6)


def test_train_then_eval_cli(tmp_path):
    workdir = str(tmp_path / "run")
    out = run_mmjax(
        "train",
        "--config",
        TINY,
        "--workdir",
        workdir,
        "--config.train.steps=10",
        "--config.evals.val.num_examples=128",
        FEW,
    )
    assert os.listdir(os.path.join(workdir, "tb"))
    ckpt = os.path.join(workdir, "checkpoints", "10")
    assert {"state", "data", "config"} <= set(os.listdir(ckpt))
    ev = run_mmjax("eval", "--config", TINY, "--workdir", workdir, "--config.evals.val.num_examples=128", FEW)
    assert "val/scene_accuracy" in ev.stdout and "step 10" in ev.stdout
    assert os.path.exists(os.path.join(workdir, "eval", "step_10.json"))
    assert "val/f1" in out.stdout


def test_bf16_compute_keeps_fp32_params(tmp_path, tiny_config):
    trainer = trainer_lib.Trainer(tiny_config("model.dtype='bfloat16'"), str(tmp_path))
    state, metrics = _one_step(trainer, trainer.init_state(), _batch(trainer))
    assert np.isfinite(float(metrics["loss"]))
    assert {p.dtype for p in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}


def test_evaluation_stops_when_any_process_runs_out(monkeypatch):
    """Two processes whose evaluation streams lost different numbers of records to skips: both
    stop at the shorter one and make the same number of collective calls."""
    peer_batches = 2
    calls = []

    def allgather(x):  # this process's flag and the peer's (the peer has 2 batches)
        calls.append(int(x))
        return np.array([int(x), int(len(calls) <= peer_batches)])

    monkeypatch.setattr(trainer_lib.jax, "process_count", lambda: 2)
    monkeypatch.setattr(trainer_lib.multihost_utils, "process_allgather", allgather)
    assert list(trainer_lib._while_all_have(iter([10, 11, 12, 13]))) == [10, 11]
    assert len(calls) == peer_batches + 1  # as many as the peer's: 2 batches, then its 0
    calls.clear()
    peer_batches = 5
    assert list(trainer_lib._while_all_have(iter([10, 11]))) == [10, 11]
    assert calls == [1, 1, 0]
