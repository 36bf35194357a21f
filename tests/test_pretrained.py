"""Weights folders named by `config.init`: loaded into the right subtree, checked, sharded."""

import jax
import ml_collections
import numpy as np
import pytest

from mmjax import parallel
from mmjax.config import ConfigError, validate
from mmjax.train import pretrained
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
    pretrained.save(path, params, {"kind": "vit", "model": dict(cfg.model)})
    return path, parallel.flat(params)


def test_init_loads_weights_except_skipped(saved, tiny_config, tmp_path):
    path, ref = saved
    cfg = _with_init(tiny_config("mesh.data=2", "mesh.fsdp=4"), vit=dict(path=path, into="", skip="^head/"))
    trainer = Trainer(cfg, str(tmp_path))
    state = trainer.init_state()
    got = parallel.flat(state.params)
    fresh = parallel.flat(Trainer(tiny_config(), str(tmp_path / "f")).init_state().params)
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
    with pytest.raises(ConfigError, match="model has no 'encoder/embedding/bias'"):
        Trainer(subtree, str(tmp_path)).init_state()
    with pytest.raises(ConfigError, match="not an mmjax weights folder"):
        validate(_with_init(tiny_config(), vit=dict(path=str(tmp_path / "nope"), into="")), 1)
    with pytest.raises(ConfigError, match="unknown keys"):
        validate(_with_init(tiny_config(), vit=dict(path=path, prefix="x")), 1)
