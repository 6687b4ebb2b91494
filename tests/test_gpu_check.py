"""bench/gpu_check.py at tiny size on CPU: the GPU check's every step runs in the suite, so it cannot
rot between GPU runs (train through the launcher, export, convert, load, compare, answer)."""

import json
import sys

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow


def test_gpu_check_passes_at_tiny_size_on_cpu(tmp_path):
    proc = run([sys.executable, "bench/gpu_check.py", "--tiny", "--work_dir", str(tmp_path / "work")], timeout=600)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[-1] == "gpu check: ok", proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(lines[-2])
    assert result["device"] == "cpu" and result["mfu"] is None and result["steps"] >= 1
    assert result["tokens_per_s"] > 0 and result["model_tflops"] > 0
    assert set(result["logit_diff"]) == {"export_hf", "zero_to_fp32_make_shards"}
    assert max(result["logit_diff"].values()) <= result["logit_bound"] == 1e-4
    answers = [json.loads(line) for line in (tmp_path / "work" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 and all("generated" in a for a in answers)
