"""Weights folders named by `config.init`: loaded into the right subtree onto the target shardings,
checked by name and shape, converted between per-layer and scanned layouts, vocabularies grown."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import tree, weights
from mmjax.config import ConfigError, validate
from mmjax.models.llm import LLM, stack_layers
from mmjax.train.trainer import Trainer


def _with_init(cfg, **entries):
    with cfg.unlocked():
        for name, spec in entries.items():
            cfg.init[name] = ml_collections.ConfigDict(spec)
    return cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from mmjax import config as config_lib
    from tests.conftest import TINY

    cfg = config_lib.load(TINY, ["seed=7"])
    params = jax.device_get(Trainer(cfg, str(tmp_path_factory.mktemp("w"))).init_state().params)
    path = str(tmp_path_factory.mktemp("weights"))
    weights.save(path, params, {"kind": "vit", "model": dict(cfg.model)})
    return path, tree.flat(params)


def test_init_loads_weights_except_skipped(saved, tiny_config, tmp_path):
    path, ref = saved
    cfg = _with_init(tiny_config("mesh.data=2", "mesh.fsdp=4"), vit=dict(path=path, into="", skip="^head/"))
    trainer = Trainer(cfg, str(tmp_path))
    state = trainer.init_state()
    got = tree.flat(state.params)
    fresh = tree.flat(Trainer(tiny_config(), str(tmp_path / "f")).init_state().params)
    for name, value in got.items():
        expected = fresh[name] if name.startswith("head/") else ref[name]
        np.testing.assert_array_equal(np.asarray(value), expected, err_msg=name)
    assert not np.allclose(ref["embedding/kernel"], fresh["embedding/kernel"])  # seeds differ
    assert got["embedding/kernel"].sharding == trainer.state_shardings.params["embedding"]["kernel"]


def test_init_errors_name_the_problem(saved, tiny_config, tmp_path):
    path, _ = saved
    wrong_width = _with_init(tiny_config("model.width=32"), vit=dict(path=path, into="", skip=""))
    with pytest.raises(ConfigError, match=r"embedding/bias.*\(64,\).*\(32,\)"):
        Trainer(wrong_width, str(tmp_path)).init_state()
    subtree = _with_init(tiny_config(), vit=dict(path=path, into="encoder", skip=""))
    with pytest.raises(ConfigError, match="the model has no 'encoder/embedding/bias'"):
        Trainer(subtree, str(tmp_path)).init_state()
    with pytest.raises(ConfigError, match="not an mmjax weights folder"):
        validate(_with_init(tiny_config(), vit=dict(path=str(tmp_path / "nope"), into="")), 1)
    with pytest.raises(ConfigError, match="unknown keys"):
        validate(_with_init(tiny_config(), vit=dict(path=path, prefix="x")), 1)


def _plan_and_load(folder, model_params, logical=None):
    targets = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in tree.flat(model_params).items()}
    spec = ml_collections.ConfigDict(dict(path=str(folder), into="", skip=""))
    sources = weights.plan("init.llm", spec, targets, logical or {})
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    dev = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    raw = weights.read(folder, sources, {n: dev for n in sources}, {n: targets[n].dtype for n in sources})
    return sources, weights.assemble(raw, sources, targets, jax.random.key(0))


def test_layouts_convert_both_ways(tmp_path):
    model = LLM(vocab_size=32, width=16, depth=3, num_heads=2, mlp_dim=32)
    per_layer = jax.device_get(
        nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
    )
    scanned = stack_layers(per_layer, 3)
    weights.save(tmp_path / "per_layer", per_layer, {"kind": "llm"})
    weights.save(tmp_path / "scanned", scanned, {"kind": "llm"})
    _, into_scanned = _plan_and_load(tmp_path / "per_layer", scanned)  # a scanned config, an HF import
    for n, v in tree.flat(scanned).items():
        np.testing.assert_array_equal(np.asarray(into_scanned[n]), v, err_msg=n)
    _, into_layers = _plan_and_load(tmp_path / "scanned", per_layer)  # a scanned export, a per-layer config
    for n, v in tree.flat(per_layer).items():
        np.testing.assert_array_equal(np.asarray(into_layers[n]), v, err_msg=n)


def test_vocabulary_grows_along_the_vocab_axis(tmp_path):
    small = LLM(vocab_size=30, width=16, depth=1, num_heads=2, mlp_dim=32)
    big = LLM(vocab_size=33, width=16, depth=1, num_heads=2, mlp_dim=32)

    p_small = jax.device_get(nn.unbox(small.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]))
    boxed = jax.eval_shape(big.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    logical = tree.flat(nn.get_partition_spec(boxed))
    weights.save(tmp_path / "w", p_small, {"kind": "llm"})
    sources, out = _plan_and_load(tmp_path / "w", nn.unbox(boxed), logical)
    table, old = np.asarray(out["embedder/embedding"]), p_small["embedder"]["embedding"]
    head, old_head = np.asarray(out["lm_head/kernel"]), p_small["lm_head"]["kernel"]
    assert table.shape == (33, 16) and head.shape == (16, 33)
    np.testing.assert_array_equal(table[:30], old)
    np.testing.assert_array_equal(head[:, :30], old_head)
    # new rows: the old rows' mean plus noise far below their spread
    assert np.abs(table[30:] - old.mean(0)).max() < 0.1 * old.std(0).min()
    assert sources["embedder/embedding"].grow == 0 and sources["lm_head/kernel"].grow == 1
    with pytest.raises(ConfigError, match="is \\(16,\\) in"):  # other axes never grow
        _plan_and_load(tmp_path / "w", {**nn.unbox(boxed), "final_norm": {"scale": jnp.zeros(17)}}, logical)
