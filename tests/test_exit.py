"""A finished run exits 0, a resumed one too: a few resumed launches, each status checked.

Ranks used to abort at interpreter exit now and then ("terminate called without an active
exception", launcher status 250) after a run that resumed and trained to the end: gloo's worker
threads outlived ``main`` and met interpreter teardown (docs/results.md, "Exit status"). The
trainer now destroys its process group on every way out; tests/test_cluster.py checks that it has
on each rank and path (``assert_left_the_process_group``), and this test runs the pattern the abort
was seen in (a failed save, then resumes to the end) through ``bench/resume_exit.py``.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import run

pytestmark = pytest.mark.slow


def test_resumed_runs_exit_zero(tmp_path):
    """Three resumes of a save path whose checkpoint 8 failed (the suite's own load is the load)."""
    proc = run([sys.executable, "bench/resume_exit.py", "--runs", "3", "--hogs", "0", "--work_dir", str(tmp_path)],
               timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["exit_statuses"] == {"0": 3} and result["runs_with_abort_line"] == 0, (result, proc.stderr[-3000:])
