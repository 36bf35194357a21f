"""The notebooks run top to bottom (code cells in order, as Colab's Run all does) with few steps."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mm1_notebook_runs(tmp_path):
    with open(os.path.join(ROOT, "notebooks", "mm1.ipynb")) as f:
        cells = json.load(f)["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    script = tmp_path / "mm1_notebook.py"
    script.write_text(code)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "MMJAX_NOTEBOOK_STEPS": "20",
        "MMJAX_NOTEBOOK_WORKDIR": str(tmp_path / "work"),
    }
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "captioning, 0-shot:" in out and "vqa_0shot/accuracy" in out
    answers = [line for line in out.splitlines() if " model: " in line and " truth: " in line]
    assert len(answers) == 8, out[-3000:]
    assert os.path.exists(tmp_path / "work" / "sft_export" / "mmjax.json")
