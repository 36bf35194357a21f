"""A workdir on a bucket: `gs://bucket/run` (a local GCS emulator, tests/gcs.py) holds the
checkpoints, metrics.jsonl, TensorBoard, evaluation artefacts, the loss plot, exports and samples;
training resumes from it and starts from weights stored there. Nothing lands in `<cwd>/gs:`."""

import json
import os

from etils import epath

from conftest import ROOT, run_mmjax

TOY = os.path.join(ROOT, "tests", "toy_recipe.py")


def test_gs_workdir_end_to_end(gcs_emulator, tmp_path):
    env = gcs_emulator.subprocess_env()
    bucket = f"gs://bucket/{tmp_path.name}"  # the emulator is shared by this worker's tests
    run = f"{bucket}/run"

    def mmjax(*args):
        return run_mmjax(*args, env=env)

    mmjax("train", "--config", TOY, "--workdir", run, "--config.train.steps=4", "--config.train.save_every=2")
    again = mmjax(
        "train", "--config", TOY, "--workdir", run, "--config.train.steps=6", "--config.train.save_every=2"
    )
    assert f"resumed from {run}/checkpoints at step 4" in again.stderr
    root = epath.Path(run)
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]  # a resumed rewrite keeps every row once
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert (root / "eval" / "step_6" / "val" / "samples.png").exists() and (root / "loss.png").exists()
    assert any((root / "tb").iterdir())

    ev = mmjax("eval", "--config", TOY, "--workdir", run)
    assert "val/mse" in ev.stdout and (root / "eval" / "step_6.json").exists()
    mmjax("export", "--config", TOY, "--workdir", run)
    assert (root / "export" / "mmjax.json").exists()
    prompts = tmp_path / "prompts.jsonl"
    run_mmjax("--write-prompts", "1", str(prompts), module="mmjax.eval.shapes_eval")
    mmjax(
        "sample", "--config", TOY, "--workdir", run, "--prompts", str(prompts), "--out", f"{bucket}/samples"
    )
    assert len((epath.Path(bucket) / "samples" / "index.jsonl").read_text().splitlines()) == 6
    samples = f"{bucket}/samples"
    scored = run_mmjax(
        "--images", samples, "--prompts", f"{samples}/index.jsonl", module="mmjax.eval.shapes_eval", env=env
    )
    assert "1.000" in scored.stdout  # shapes-eval reads the bucket too

    init = f"--config.init={{'w': {{'path': '{run}/export', 'into': '', 'skip': ''}}}}"
    mmjax(
        "train",
        "--config",
        TOY,
        "--workdir",
        f"{bucket}/init",
        init,
        "--config.train.steps=1",
        "--config.evals={}",
    )
    assert (epath.Path(bucket) / "init" / "checkpoints" / "1").exists()
    assert not os.path.exists(os.path.join(ROOT, "gs:")) and not os.path.exists("gs:")
