"""The notebooks run top to bottom (code cells in order, as Colab's Run all does) with few steps."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_mmjax, xla_flags

from mmjax import tree, weights

# A recipe's config file as the notebook's MMJAX_CONFIGS folder (the one a Colab copy points at), with
# less to render: 256 records per training component instead of 2048-4096 (each is rendered and cached
# when its stage starts) and one batch per evaluator (the notebook's last cells read one).
SMALL = """
import importlib.util

_spec = importlib.util.spec_from_file_location("_base_configs", {path!r})
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)
VARIANTS = _base.VARIANTS


def get_config(arg=None):
    c = _base.get_config(arg)
    for stage in [c[s] for s in c.stages] if "stages" in c else [c]:
        for comp in stage.data.components.values():
            comp.num_records = 256
        for ev in stage.evals.values():
            ev.num_examples = ev.batch_size
    return c
"""


def run_notebook(name: str, tmp_path, env: dict, small: bool = False, timeout: int = 900) -> str:
    """notebooks/NAME.ipynb's code cells in order in a fresh process (as Colab's Run all); its stdout.
    `small`: configs/NAME.py through SMALL."""
    with open(os.path.join(ROOT, "notebooks", f"{name}.ipynb")) as f:
        cells = json.load(f)["cells"]
    script = tmp_path / f"{name}_notebook.py"
    script.write_text("\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))
    extra = {"XLA_FLAGS": xla_flags(1), "MMJAX_NOTEBOOK_WORKDIR": str(tmp_path / "work")}
    if small:
        configs = tmp_path / "configs"
        configs.mkdir()
        (configs / f"{name}.py").write_text(SMALL.format(path=os.path.join(ROOT, "configs", f"{name}.py")))
        extra["MMJAX_CONFIGS"] = str(configs)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env={**os.environ, **extra, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.long
def test_mm1_notebook_runs(tmp_path):
    out = run_notebook("mm1", tmp_path, {"MMJAX_NOTEBOOK_STEPS": "10"}, small=True)
    assert "captioning, 0-shot:" in out and "vqa_0shot/accuracy" in out
    answers = [line for line in out.splitlines() if " model: " in line and " truth: " in line]
    assert len(answers) == 8, out[-3000:]
    assert os.path.exists(tmp_path / "work" / "sft_export" / "mmjax.json")


@pytest.mark.long(4)
def test_iomm_notebook_runs_the_chain_and_sample_works_on_its_workdir(tmp_path):
    """The tiny IOMM chain with few steps: the report (shapes-eval table, grid path), samples next
    to prompts, edits; then `mmjax sample` and `shapes-eval` on the same workdir."""
    work = tmp_path / "work"
    env = {
        "MMJAX_NOTEBOOK_STEPS": os.environ.get("MMJAX_TEST_IOMM_STEPS", "10"),
        "MMJAX_NOTEBOOK_MLLM_STEPS": "10",
        "MMJAX_NOTEBOOK_PROMPTS": "2",
        "MMJAX_NOTEBOOK_OVERRIDES": " ".join(
            [
                "stage1.evals={}",
                "stage2.train.steps=60",
                "stage2.train.log_every=10",
                "stage2.model.sample.steps=8",  # every sampler: evaluators, the notebook's cells
                # the three samplers share a batch size (one compilation, cached); one batch for edits
                "stage2.evals.geneval.batch_size=24",
                *(
                    f"stage2.evals.{e}.{k}=24"
                    for e in ("edit", "reconstruct")
                    for k in ("num_examples", "batch_size")
                ),
                *(
                    f"stage2.evals.{e}.{k}=64"
                    for e in ("loss_image", "loss_t2i")
                    for k in ("num_examples", "batch_size")
                ),
                *(f"mllm.data.components.{c}.num_records=256" for c in ("caption", "interleaved", "text")),
                "stage1.data.components.images.num_records=256",
                "stage2.data.components.images.num_records=256",
            ]
        ),
    }
    out = run_notebook("iomm", tmp_path, env, timeout=1200)
    assert "| overall |" in out and "| held_out |" in out and "| correct |" in out, out[-3000:]
    grid = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("samples: ")]
    assert grid and os.path.getsize(grid[0]) > 0
    assert sum(line.endswith(": 4 samples") for line in out.splitlines()) == 4
    assert sum(line.startswith("edit ") and "change made" in line for line in out.splitlines()) == 4
    # the stage-2 generator learns (whether it reaches a GenEval score is the benchmarks' business:
    # BENCHMARKS.md section 9, time to quality); the table above is its evaluation
    rows = [json.loads(line) for line in (work / "stage2" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert any("geneval/overall" in r for r in rows)
    # the README's second command, on the notebook's workdir
    samples = tmp_path / "samples"
    run_mmjax(
        "sample",
        "--config",
        "configs/iomm.py:tiny",
        "--workdir",
        str(work),
        "--out",
        str(samples),
        "--prompt",
        "a red circle to the left of a blue square",
        "--num-samples",
        "2",
    )
    index = [json.loads(line) for line in (samples / "index.jsonl").read_text().splitlines()]
    assert len(index) == 2 and all((samples / r["file"]).exists() for r in index)


@pytest.mark.long
def test_mmgem_notebook_runs_its_three_stages_each_changing_only_its_own_parameters(tmp_path):
    """The tiny MM-GEM pipeline with few steps: the final stage's table, retrieval examples,
    captions checked by the scorer and region captions; and, from each stage's export against the
    one before, region captioning moved only h3 and the soft prompts, region retrieval only h4."""
    out = run_notebook("mmgem", tmp_path, {"MMJAX_NOTEBOOK_STEPS": "20"}, small=True)
    lines = out.splitlines()
    for metric in (
        "retrieval/i2t_R@1",
        "zeroshot/accuracy",
        "captioning/cider_d",
        "region_retrieval/i2t_R@1",
    ):
        assert any(line.startswith(f"| {metric} |") for line in lines), out[-3000:]
    assert sum(" -> " in line and line.rstrip().endswith(("yes", "no")) for line in lines) == 4
    assert sum(line.startswith("caption ") and "true of the scene:" in line for line in lines) == 6
    assert sum(line.startswith("region ") and "truth:" in line for line in lines) == 6
    assert os.path.exists(tmp_path / "work" / "export" / "mmjax.json")
    # the evaluation's artefacts: retrieval examples as an image, captions as rows
    evals = tmp_path / "work" / "region_retrieval" / "eval"
    assert list(evals.glob("step_*/retrieval/examples.png")) and list(
        evals.glob("step_*/captioning/captions.jsonl")
    )
    read = lambda stage: tree.flat(weights.load(str(tmp_path / "work" / stage))[0])  # noqa: E731
    s1, s2a, s2b = read("stage1/export"), read("region_caption/export"), read("export")
    moved = lambda a, b: {n for n in b if n not in a or not np.array_equal(a[n], b[n])}  # noqa: E731
    assert moved(s1, s2a) == {"h3/kernel", "h3/bias", "soft_prompts"}
    assert moved(s2a, s2b) == {"h4/kernel", "h4/bias"}
    np.testing.assert_array_equal(s1["h4/kernel"], np.eye(len(s1["h4/kernel"])))  # h4 starts as the identity


@pytest.mark.long
def test_unicode_notebook_runs_both_stages_and_sample_works_on_its_workdir(tmp_path):
    """The tiny UniCode pipeline with few steps: each stage's table, reconstructions through LLM
    tokens, images the LLM wrote (scored by the detector), answers; then `mmjax sample`."""
    out = run_notebook("unicode", tmp_path, {"MMJAX_NOTEBOOK_STEPS": "10"}, small=True)
    lines = out.splitlines()
    for metric in ("reconstruct/psnr", "reconstruct/usage", "vqa/accuracy", "vqa/prior", "geneval/overall"):
        assert any(line.startswith(f"| {metric} |") for line in lines), out[-3000:]
    assert sum(": 2 images, detected: " in line for line in lines) == 2
    assert sum(line.startswith("Q: ") and " model: " in line for line in lines) == 4
    params, meta = weights.load(str(tmp_path / "work" / "export"))
    assert meta["code_grid"] == [8, 8, 2] and len(set(np.asarray(params["token_ids"]).tolist())) == 256
    samples = tmp_path / "samples"
    run_mmjax(
        "sample",
        *("--config", "configs/unicode.py:tiny", "--workdir", str(tmp_path / "work"), "--out", str(samples)),
        *("--prompt", "a red circle", "--num-samples", "2"),
    )
    index = [json.loads(line) for line in (samples / "index.jsonl").read_text().splitlines()]
    assert len(index) == 2 and all((samples / r["file"]).exists() for r in index)
