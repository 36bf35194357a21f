"""Optimizer factory pieces not covered through the trainer: the MM1 learning-rate law."""

import jax
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.config import ConfigError
from mmjax.train import optim


@pytest.mark.parametrize("n", [9e6, 85e6, 302e6, 1.2e9, 2.9e9])
def test_mm1_lr_law_matches_the_formula(n):
    eta, wd = optim.mm1_lr_law(int(n))
    np.testing.assert_allclose(eta, np.exp(-0.4214 * np.log(int(n)) - 0.5535), rtol=1e-12)
    assert wd == 0.1  # optax scales decay by lr: lambda = 0.1 * eta per step


def test_lr_law_sets_the_schedule_peak_and_floor():
    cfg = config_lib.base().optim
    cfg.update(lr_law="mm1", warmup_steps=10, lr_floor=0.1)
    params = {
        "w": jax.ShapeDtypeStruct((1000, 1000), np.float32),
        "b": jax.ShapeDtypeStruct((1000,), np.float32),
    }
    opt = optim.build(cfg, params, total_steps=100)
    eta, _ = optim.mm1_lr_law(1_001_000)
    np.testing.assert_allclose(float(opt.schedule(10)), eta, rtol=1e-6)
    np.testing.assert_allclose(float(opt.schedule(100)), 0.1 * eta, rtol=1e-6)
    cfg.lr_law = "chinchilla"
    with pytest.raises(ConfigError, match="optim.lr_law='chinchilla'"):
        optim.build(cfg, params, total_steps=100)
