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
    "--config.sft.evals={}",
]


@pytest.mark.long(2)
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
    assert done[0] == done[1] and done[0]["step"] == 8
    assert "stage sft: " in again.stdout and "loss/qa" in again.stdout  # each stage's results are printed
    # eval / sample / export on the pipeline's workdir take its last stage
    from mmjax.train import stages, trainer as trainer_lib

    pipeline = config_lib.load(PIPELINE, [a.removeprefix("--config.") for a in ARGS])
    last, workdir = stages.last(pipeline, broken)
    assert workdir == os.path.join(broken, "sft") and "qa" in last.data.components
    assert last.init.mm1.path == os.path.join(broken, "pretrain", "export")
    assert trainer_lib.Trainer(last, workdir).latest()[3] == 8


def test_pipeline_links_are_checked():
    from mmjax import config as C

    stage = config_lib.load(os.path.join(ROOT, "configs", "mm1.py:tiny"))
    with pytest.raises(ConfigError, match="names no init/frozen entry"):
        C.pipeline(("a", stage, {}), ("b", stage, {"init.nope": "a"}))
    with pytest.raises(ConfigError, match="not an earlier stage"):
        C.pipeline(("a", stage, {"init.llm": "b"}), ("b", stage, {}))


def test_check_compiles_every_stage(capsys):
    """`mmjax check` on a pipeline: each stage's step compiles, its links left open (no weights)."""
    from mmjax import cli

    assert cli.main(["check", "--config", PIPELINE, *ARGS]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in lines] == ["pretrain", "sft"]
    assert all(r["params"] > 0 and r["argument_bytes"] > 0 for r in lines)
