"""Config loading, locked keys, overrides, and validation before anything compiles."""

import pytest

from conftest import TINY, run_mmjax
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
    with pytest.raises(ConfigError, match="has no variant 'huge'; variants: tiny, base"):
        config_lib.load(TINY.replace(":tiny", ":huge"))
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load("configs/nope.py")


def test_unknown_variant_is_one_line_on_the_command_line():
    proc = run_mmjax("train", "--config", "configs/mm1.py:tiny_sfft", "--workdir", "/tmp/x", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mmjax: config error: configs/mm1.py has no variant 'tiny_sfft'; variants: tiny, tiny_sft, tiny_sft_hires, "
        "tiny_sft_subimages, tiny_pipeline, 1b, 3b, 3b_moe, 1b_pipeline"
    ]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["mesh.data=3"], "needs 3 devices but 8 are available"),
        (["mesh.data=-1", "mesh.fsdp=3"], "does not divide the 8 available"),
        (["data.global_batch_size=12"], "divisible by the data-parallel size 8"),
        (["train.grad_accum=3"], "times train.grad_accum=3"),
        (["data.components.shapes.path='/no/such/dir'"], "path='/no/such/dir' does not exist"),
        (["data.components.shapes.weight=0.0"], "weight=0.0 must be > 0"),
        (["data.components.shapes.source='webdatset'"], "source='webdatset'; available: shapes"),
        (["optim.freeze=('NoSuchLayer',)"], "optim.freeze pattern 'NoSuchLayer' matches no parameter"),
        (["optim.groups=(('nope', 0.1),)"], "optim.groups\\[0\\] pattern 'nope' matches no trainable"),
        (["optim.name='sgdx'"], "choose adamw, lamb, adafactor"),
        (["recipe='nope'"], "recipe 'nope' not found"),
        (
            ["evals.val.batch_size=12", "evals.val.num_examples=48"],
            "evals.val.batch_size=12 must be divisible by the data-parallel size 8",
        ),
        (
            ["evals.val.num_examples=100"],
            "evals.val.num_examples=100 must be a multiple of its batch_size=64",
        ),
        (["train.log_every=-1"], "train.log_every=-1 must be >= 0 \\(0 turns it off\\)"),
        (["train.save_every=-5"], "train.save_every=-5 must be >= 0"),
        (["train.eval_every=-1"], "train.eval_every=-1 must be >= 0"),
        (["train.grad_accum=0"], "train.grad_accum=0 must be >= 1"),
        (["train.ema_decay=1.0"], "train.ema_decay=1.0 must be in \\[0, 1\\)"),
        (["train.ema_decay=-0.1"], "train.ema_decay=-0.1 must be in \\[0, 1\\)"),
    ],
)
def test_config_errors_before_compilation(tiny_config, tmp_path, monkeypatch, overrides, needle):
    def no_compile(*a, **k):
        raise AssertionError("compiled before the config error was found")

    monkeypatch.setattr(trainer_lib.jax, "jit", no_compile)
    with pytest.raises(ConfigError, match=needle):
        trainer_lib.Trainer(tiny_config(*overrides), str(tmp_path)).compile_step(None)


def test_every_documented_config_variant_exists():
    """Every `configs/NAME.py:VARIANT` the README, the launchers, the notebooks and the configs'
    own docstrings name is a variant the config file declares."""
    import glob
    import importlib.util
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = ["README.md", *glob.glob("launch/*"), *glob.glob("notebooks/*.ipynb"), *glob.glob("configs/*.py")]
    named = set()
    for f in files:
        with open(os.path.join(root, f)) as fh:
            named |= {(m[0], m[1], f) for m in re.findall(r"(configs/\w+\.py):(\w+)", fh.read())}
    assert any(f.startswith("launch/slurm") for _, _, f in named)
    for path, variant, where in sorted(named):
        spec = importlib.util.spec_from_file_location("_c", os.path.join(root, path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert variant in module.VARIANTS, f"{where} names {path}:{variant}; variants: {module.VARIANTS}"
