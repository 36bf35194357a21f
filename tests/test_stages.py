"""Multi-stage runs (configs/mm1.py:tiny_pipeline: pre-training -> export -> SFT from it): killed in
the middle of a stage (between two saves) and restarted with the same command, a pipeline skips the finished stage,
resumes the interrupted one and ends exactly as the run straight through did."""

import json
import os

import pytest

from conftest import ROOT, read_metrics, run_mmjax
from mmjax import config as config_lib
from mmjax.config import ConfigError

PIPELINE = os.path.join(ROOT, "configs", "mm1.py:tiny_pipeline")
ARGS = [
    "--config.pretrain.train.steps=8",
    "--config.pretrain.train.save_every=4",
    "--config.pretrain.evals={}",
    *[f"--config.pretrain.data.components.{n}.num_records=64" for n in ("caption", "interleaved", "text")],
    "--config.sft.train.steps=8",
    "--config.sft.train.save_every=4",
    "--config.sft.train.log_every=1",
    "--config.sft.data.components.qa.num_records=64",
    "--config.sft.evals.vqa_0shot.num_examples=32",
]


def test_killed_pipeline_restarts_to_the_same_result(tmp_path):
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    run_mmjax("train", "--config", PIPELINE, "--workdir", straight, *ARGS)
    killed = run_mmjax(
        "train",
        "--config",
        PIPELINE,
        "--workdir",
        broken,
        *ARGS,
        "--config.sft.debug.kill_at_step=6",
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert os.path.exists(os.path.join(broken, "pretrain", "stage.json"))  # finished before the kill
    assert not os.path.exists(os.path.join(broken, "sft", "stage.json"))
    again = run_mmjax("train", "--config", PIPELINE, "--workdir", broken, *ARGS)  # the user's command again
    assert "stage pretrain is finished" in again.stderr and "resumed from" in again.stderr
    for stage in ("pretrain", "sft"):
        a, b = read_metrics(os.path.join(straight, stage)), read_metrics(os.path.join(broken, stage))
        assert sorted(a) == sorted(b) and all(a[s]["loss"] == b[s]["loss"] for s in a), stage
    done = [json.load(open(os.path.join(w, "sft", "stage.json"))) for w in (straight, broken)]
    assert done[0] == done[1] and "vqa_0shot/accuracy" in done[0]
    assert "stage sft: " in again.stdout  # each stage's evaluation is printed
    # eval on the pipeline's workdir evaluates the last stage
    ev = run_mmjax("eval", "--config", PIPELINE, "--workdir", broken, *ARGS)
    assert "step 8" in ev.stdout and "vqa_0shot/accuracy" in ev.stdout


def test_pipeline_links_are_checked():
    from mmjax import config as C

    stage = config_lib.load(os.path.join(ROOT, "configs", "mm1.py:tiny"))
    with pytest.raises(ConfigError, match="names no init/frozen entry"):
        C.pipeline(("a", stage, {}), ("b", stage, {"init.nope": "a"}))
    with pytest.raises(ConfigError, match="not an earlier stage"):
        C.pipeline(("a", stage, {"init.llm": "b"}), ("b", stage, {}))
