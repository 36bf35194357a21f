"""`mmjax plan`: per-device memory and FLOPs of the train step on fake CPU devices and for a TPU
topology (libtpu, in the test extra, compiles for it without a TPU)."""

import math
import sys

import jax
import numpy as np
import pytest
from conftest import TINY, run_mmjax

from mmjax import parallel, plan
from mmjax.config import ConfigError

# libtpu is in the test extra on Linux (its only wheels); compile-only planning shares it with
# any other process that holds it
needs_libtpu = pytest.mark.skipif(sys.platform != "linux", reason="libtpu has Linux wheels only")


@pytest.fixture(autouse=True)
def _share_libtpu(monkeypatch):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _shard_bytes(tree, shardings):
    leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
    return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a, s in leaves)


def test_fake_devices_state_bytes_follow_fsdp(tiny_config):
    """State bytes are the per-shard leaf sizes, and equal the CPU compiler's argument bytes less
    the batch slice; fsdp=8 holds about 1/8 of fsdp=1's state."""
    from mmjax.train import trainer as trainer_lib

    devices = jax.devices()[:8]
    rows = {}
    for fsdp in (1, 8):
        config = tiny_config(f"mesh.fsdp={fsdp}")
        rows[fsdp] = r = plan.plan_one(config, devices)
        trainer = trainer_lib.Trainer(config, "", mesh=parallel.make_mesh(config, devices))
        expect = _shard_bytes(trainer.abstract_state, trainer.state_shardings)
        assert r["state_bytes"] == expect
        # the compiler agrees to a few bytes (a few int32 scalars, BENCHMARKS.md section 2)
        assert abs(r["argument_bytes"] - r["state_bytes"] - r["batch_bytes"]) <= 64
        assert r["temp_bytes"] > 0 and r["peak_bytes"] >= r["argument_bytes"] and r["matmul_flops"] > 0
    assert rows[8]["mesh"]["fsdp"] == 8
    assert rows[8]["state_ideal_bytes"] == pytest.approx(rows[1]["state_bytes"] / 8)
    assert rows[8]["state_bytes"] <= 1.1 * rows[1]["state_bytes"] / 8
    assert rows[8]["matmul_flops"] == rows[1]["matmul_flops"]  # the same step, sharded otherwise
    text = plan.table(rows[8], "")
    assert "state (exact)" in text and "a CPU compiler's estimate" in text and "FLOPs per step" in text


def test_cli_sets_its_fake_devices_and_fits():
    """`--devices 2` in a process started with one device; a limit the config meets as it is."""
    proc = run_mmjax("plan", "--config", TINY, "--devices", "2", "--memory-gb", "1", devices=1)
    assert "on 2 x cpu (fake CPU devices)" in proc.stdout
    assert "fits 1 GiB with: the config as it is" in proc.stdout


def test_candidates_fsdp_then_remat_then_accumulation(tiny_config):
    c = tiny_config("model.remat=nothing_saveable", "data.global_batch_size=16")
    out = plan.candidates(c, 4)  # the strongest remat already: fsdp sizes, then accumulation
    assert out[:3] == [{}, {"mesh.data": -1, "mesh.fsdp": 2}, {"mesh.data": -1, "mesh.fsdp": 4}]
    assert out[3:] == [{**out[2], "train.grad_accum": k} for k in (2, 4)]  # 16 rows over 4 devices
    weak = plan.candidates(tiny_config("data.global_batch_size=4"), 2)  # remat '': both stronger ones
    mesh = lambda f: {"mesh.data": -1, "mesh.fsdp": f}
    assert weak == [
        {},
        mesh(2),
        {**mesh(1), "model.remat": "dots"},
        {**mesh(2), "model.remat": "dots"},
        {**mesh(1), "model.remat": "full"},
        {**mesh(2), "model.remat": "full"},
        {**mesh(2), "model.remat": "full", "train.grad_accum": 2},
    ]
    every = plan.candidates(tiny_config("mesh.data=1", "mesh.fsdp=-1", "data.global_batch_size=4"), 2)
    assert every[:2] == [{}, {**mesh(2), "model.remat": "dots"}]  # fsdp=-1 is 2 already: no smaller one


def test_out_of_memory_is_reported_and_searched_past(tiny_config, monkeypatch):
    """A TPU compiler out of HBM compiles nothing: the plan says so (state bytes still exact), and
    the search goes on to the next candidate (here gradient accumulation), which fits."""
    from mmjax.train import trainer as trainer_lib

    compile_step = trainer_lib.Trainer.compile_step
    msg = "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (20.50G) exceeds"

    def fake(self, batch):  # out of memory unless accumulating
        if self.config.train.grad_accum == 1:
            raise RuntimeError(msg)
        return compile_step(self, batch)

    monkeypatch.setattr(trainer_lib.Trainer, "compile_step", fake)
    config = tiny_config("model.remat=nothing_saveable", "data.global_batch_size=2")
    r = plan.plan(config, devices=1, memory_gb=1)[0]
    assert r["oom"] == msg and r["temp_bytes"] == 20.5 * plan.GiB and r["state_bytes"] > 0
    assert [t["overrides"] for t in r["fit"]["tried"]] == [[], ["--config.train.grad_accum=2"]]
    assert r["fit"]["fits"]["overrides"] == ["--config.train.grad_accum=2"]
    text = plan.table(r, "")
    assert "the TPU compiler gave up" in text and "fits 1 GiB with: --config.train.grad_accum=2" in text


@needs_libtpu
def test_tpu_topology_compiles_without_a_tpu(tiny_config):
    r = plan.plan(tiny_config("mesh.fsdp=4"), topology="v5e:2x2")[0]
    assert r["device_kind"] == "TPU v5 lite" and r["devices"] == 4 and r["mesh"]["fsdp"] == 4
    assert r["temp_bytes"] > 0 and r["compiler_flops_per_device"] > 0
    assert r["argument_bytes"] >= r["state_bytes"] + r["batch_bytes"]  # TPU layouts pad, never shrink
    assert r["state_bytes"] <= 1.1 * r["state_ideal_bytes"]
    text = plan.table(r, "v5e:2x2")
    assert "the TPU compiler's" in text and "fits the 15.75 GiB of HBM a program may use" in text


@needs_libtpu
@pytest.mark.parametrize("name", ["v5e:3x3", "v9:2x2", "v5e"])
def test_bad_topology_is_a_clear_error(name):
    with pytest.raises(ConfigError, match=rf"--topology '{name}'.*e\.g\. v5e:2x4"):
        plan.topology_devices(name)


def test_bad_topology_exits_2(capsys):
    args = plan_args(config=TINY, topology="tpu9")
    assert plan.main(args, []) == 2
    assert "mmjax plan: --topology 'tpu9'" in capsys.readouterr().err


def plan_args(**kw):
    import argparse

    parser = argparse.ArgumentParser()
    plan.add_parser(parser.add_subparsers())
    return parser.parse_args(["plan", *[f"--{k}={v}" for k, v in kw.items()]])


def test_eval_batch_sizes_do_not_stop_a_plan(tiny_config):
    config = tiny_config("data.global_batch_size=48")  # 3 devices: evals.val's 64 does not divide
    part, note = plan._train_only(config, 3)
    assert note.startswith("evaluators left out: evals.val.batch_size=64") and not part.evals and config.evals
    with pytest.raises(ConfigError, match="global_batch_size"):
        plan._train_only(config, 5)


@needs_libtpu
def test_auto_attention_resolves_for_the_slice_planned_for(tiny_config):
    """Under `--topology` on a CPU host, 'auto' is the TPU's splash kernel (its mask info made on
    the host), not the host's dense path."""
    import jax

    from mmjax import parallel
    from mmjax.models import layers

    c = tiny_config("mesh.fsdp=4")
    mesh = parallel.make_mesh(c, plan.topology_devices("v5e:2x2"))
    q = jax.ShapeDtypeStruct((4, 128, 4, 64), jax.numpy.bfloat16)
    seg = jax.ShapeDtypeStruct((4, 128), jax.numpy.int32)
    attend = lambda q, s: layers.dot_product_attention(
        q, q, q, segment_ids=s, is_causal=True, implementation="auto"
    )
    with jax.set_mesh(mesh):
        assert layers.attention_impl("auto") == "splash"
        text = jax.jit(attend).lower(q, seg).as_text()
    assert "tpu_custom_call" in text
    assert layers.attention_impl("auto") == "xla"  # no mesh: this CPU host


def test_matmul_flops_count_inside_pallas_kernels():
    """A Pallas kernel's body counts once per grid point: splash attention (interpret mode) gives
    the dense path's forward FLOPs; its backward recomputes the scores, so it counts more."""
    from mmjax.models.llm import LLM

    tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 64)
    llm = dict(vocab_size=64, width=32, depth=1, num_heads=4, num_kv_heads=2, mlp_dim=64)
    params = LLM(**llm).init(jax.random.key(1), tokens[:, :8])["params"]
    fwd, grad = {}, {}
    for impl in ("xla", "splash"):
        apply = lambda p, impl=impl: LLM(**llm, attention=impl).apply({"params": p}, tokens)[0]
        fwd[impl] = plan.matmul_flops(jax.make_jaxpr(apply)(params))
        grad[impl] = plan.matmul_flops(jax.make_jaxpr(jax.grad(lambda p: apply(p).sum()))(params))
    assert fwd["splash"] == fwd["xla"] > 0
    assert grad["splash"] > grad["xla"] > fwd["xla"]


def test_matmul_flops_count_every_shard_of_a_shard_map():
    """Under a mesh splash attention runs in a shard_map over batch and heads: its body sees one
    shard, and the count is the whole step's, the same as without a mesh."""
    import flax.linen as nn

    from mmjax.models import layers

    q = jax.ShapeDtypeStruct((4, 128, 4, 16), jax.numpy.float32)
    seg = jax.ShapeDtypeStruct((4, 128), jax.numpy.int32)

    def flops(impl):
        attend = lambda q, s: layers.dot_product_attention(
            q, q, q, segment_ids=s, is_causal=True, implementation=impl
        )
        return plan.matmul_flops(jax.make_jaxpr(attend)(q, seg))

    mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = [("batch", "data"), ("act_heads", "tensor")]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = flops("splash")
    assert sharded == flops("splash") == flops("xla") > 0
