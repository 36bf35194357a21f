"""Config loading, locked keys, overrides, and validation before anything compiles."""

import pytest

from conftest import TINY
from mmjax import config as config_lib
from mmjax.config import ConfigError
from mmjax.train import trainer as trainer_lib


def test_overrides_and_types(tiny_config):
    c = tiny_config(
        "train.steps=7",
        "optim.lr=1",
        "data.components.shapes.weight=0.5",
        "optim.freeze=('a', 'b')",
        "mesh.fsdp=2",
    )
    assert c.train.steps == 7 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.data.components.shapes.weight == 0.5 and c.optim.freeze == ("a", "b") and c.mesh.fsdp == 2


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'; did you mean steps"),
        ("trian.steps=3", "unknown config key 'trian'"),
        ("train.steps=many", "train.steps is a int"),
        ("train.steps", "must look like key.sub=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(tiny_config, override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        tiny_config(override)


def test_unknown_variant_and_missing_file():
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.load(TINY.replace(":tiny", ":huge"))
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load("configs/nope.py")


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["mesh.data=3"], "needs 3 devices but 8 are available"),
        (["mesh.data=-1", "mesh.fsdp=3"], "does not divide the 8 available"),
        (["data.global_batch_size=12"], "divisible by the data-parallel size 8"),
        (["train.grad_accum=3"], "times train.grad_accum=3"),
        (["data.components.shapes.path='/no/such/dir'"], "path='/no/such/dir' does not exist"),
        (["data.components.shapes.weight=0.0"], "weight=0.0 must be > 0"),
        (["data.components.shapes.source='webdataset'"], "source='webdataset'; available: shapes"),
        (["optim.freeze=('NoSuchLayer',)"], "optim.freeze pattern 'NoSuchLayer' matches no parameter"),
        (["optim.groups=(('nope', 0.1),)"], "optim.groups\\[0\\] pattern 'nope' matches no trainable"),
        (["optim.name='sgdx'"], "choose adamw, lamb or adafactor"),
        (["recipe='nope'"], "recipe 'nope' not found"),
    ],
)
def test_config_errors_before_compilation(tiny_config, tmp_path, monkeypatch, overrides, needle):
    def no_compile(*a, **k):
        raise AssertionError("compiled before the config error was found")

    monkeypatch.setattr(trainer_lib.jax, "jit", no_compile)
    with pytest.raises(ConfigError, match=needle):
        trainer_lib.Trainer(tiny_config(*overrides), str(tmp_path)).compile_step(None)
