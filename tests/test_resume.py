"""Checkpoints and exact resume on 2 CPU ranks through the DeepSpeed launcher.

Both runs go through tests/trace_train.py (train_sft.py with the sample ids of every step recorded,
and a SIGKILL in the middle of writing a chosen checkpoint). Run A trains uninterrupted. Run B is
SIGKILLed after a checkpoint, resumed, killed again in the middle of writing a checkpoint, and
resumed again. A and B must end with the same weights and
must have trained every optimizer step on the same samples.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, clean_env, free_port, make_records, run
from tests.test_train import losses

pytestmark = pytest.mark.slow  # launcher runs and child processes

ARGS = ["--epochs", "2", "--batch_size", "4", "--micro_batch_size", "1", "--lr", "5e-3", "--warmup_steps", "1",
        "--dtype", "fp32", "--gradient_checkpointing", "false", "--save_steps", "4", "--keep_last", "2"]
TOTAL = 20  # 2 epochs x 40 samples / 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "data.json"
    path.write_text(json.dumps(make_records(40, seed=1)))
    return path


def launch(model, data, save, *extra, env=None):
    """The DeepSpeed launcher on 2 CPU ranks, running tests/trace_train.py (train_sft.py plus the
    per-step sample ids in ``trace(save)``, and CRASH_AT_SAVE)."""
    trace(save).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "tests/trace_train.py", "--model_path", str(model), "--data_path", str(data), "--save_path", str(save),
           *ARGS, *extra]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "TRACE_DIR": str(trace(save)), **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def trace(save):
    return save.parent / f"{save.name}-trace"



def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def weights(save, tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(save), tag=tag)


def steps_seen(save):
    """{(rank, step): sample ids}; a step re-run after a resume overwrites the killed attempt."""
    seen = {}
    for rank in (0, 1):
        for line in (trace(save) / f"samples_rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            seen[rank, row["step"]] = row["ids"]
    return seen


def test_killed_and_resumed_run_equals_uninterrupted_run(tiny_model_dir, data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    code, out, err = finish(launch(tiny_model_dir, data, a))
    assert code == 0, err[-3000:]
    assert "2 ranks x 2 accumulation x 1 = batch 4" in out
    curve = losses(out)
    assert len(curve) == TOTAL and curve[-1] < curve[0] - 1.0, curve
    assert sorted(p.name for p in a.glob("global_step*")) == ["global_step16", "global_step20"]  # keep_last 2

    # B, first life: SIGKILL the whole launch once checkpoint 8 is complete.
    proc = launch(tiny_model_dir, data, b)
    deadline = time.time() + 300
    while not ((b / "latest").is_file() and (b / "latest").read_text() == "global_step8"):
        assert proc.poll() is None and time.time() < deadline, "run B ended before checkpoint 8"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)

    # Second life: resumes from 8, dies halfway through writing checkpoint 12.
    code, out, err = finish(launch(tiny_model_dir, data, b, "--resume", "true", env={"CRASH_AT_SAVE": "12"}))
    assert code != 0
    assert "starting at 8" in out
    assert (b / "latest").read_text() == "global_step8"  # the cut-off checkpoint never became latest
    assert (b / "tmp-global_step12").is_dir() and not (b / "global_step12").exists()

    # Third life: resumes from 8 again, not from the half-written 12, and finishes.
    code, out, err = finish(launch(tiny_model_dir, data, b, "--resume", "true"))
    assert code == 0, err[-3000:]
    assert "starting at 8" in out
    assert not list(b.glob("tmp-*"))

    wa, wb = weights(a, "global_step20"), weights(b, "global_step20")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    seen_a, seen_b = steps_seen(a), steps_seen(b)
    assert seen_a == seen_b and len(seen_a) == 2 * TOTAL
    per_epoch = [sorted(i for (r, s), ids in seen_a.items() if (s - 1) // 10 == e for i in ids) for e in (0, 1)]
    assert per_epoch == [list(range(40)), list(range(40))]  # no sample lost or seen twice


def test_resume_refuses_a_changed_data_order_before_building_the_model(tiny_model_dir, data, tmp_path):
    save = tmp_path / "c"
    (save / "global_step3").mkdir(parents=True)
    (save / "latest").write_text("global_step3")
    from openalpaca.config import TrainConfig

    config = {**TrainConfig().to_dict(), "seed": 0, "batch_size": 4, "micro_batch_size": 1, "max_length": 1024,
              "epochs": 2}
    state = {"global_step": 3, "epoch": 0, "num_samples": 40, "world_size": 2, "config": config}
    (save / "global_step3" / "trainer_state.json").write_text(json.dumps(state))
    proc = run([sys.executable, "train_sft.py", "--model_path", str(tiny_model_dir), "--data_path", str(data),
                "--save_path", str(save), *ARGS, "--resume", "true", "--seed", "5"], timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot resume {save}/global_step3: the data order changed (seed 0 -> 5)" in proc.stderr


def test_non_finite_loss_stops_naming_the_step(tiny_model_dir, data, tmp_path):
    """A NaN weight makes the very first loss NaN: the run stops there and writes no checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, model)
    tensors = load_file(model / "model.safetensors")
    tensors["lm_head.weight"][5, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    save = tmp_path / "nan"
    proc = run([sys.executable, "train_sft.py", "--model_path", str(model), "--data_path", str(data),
                "--save_path", str(save), *ARGS, "--save_steps", "1", "--micro_batch_size", "4"])
    assert proc.returncode == 1
    assert "error: non-finite loss nan at step 1; stopping" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (save / "latest").exists() and not list(save.glob("global_step*"))
