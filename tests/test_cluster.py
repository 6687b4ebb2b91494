"""What a cluster does to a run: preemption, a resume on another world size, two nodes, a failed save.

Every run goes through ``scripts/train_sft.sh`` on CPU ranks, with ``TRAIN_ENTRY=tests/trace_train.py``
so that the sample ids of every step are recorded (the trainer itself is unchanged). The reference
is one uninterrupted 2-rank run (``uninterrupted``).

The weight bound, 1e-6 (max abs difference of the fp32 weights after 20 steps), is the one the
SIGKILL test uses. A resumed run differs from the uninterrupted one only in the order in which
floats are summed (gradient accumulation and the all-reduce over another number of ranks): about
1e-7 relative per step, well under 1e-6 after a few Adam steps of lr 5e-3 on weights of order 1.
A resume that lost the optimizer state would restart Adam's moments, and Adam's first update
moves every weight by about lr = 5e-3: three orders of magnitude above the bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO, clean_env, free_port, make_records

pytestmark = pytest.mark.slow
ARGS = ["--epochs", "2", "--batch_size", "4", "--micro_batch_size", "1", "--lr", "5e-3", "--warmup_steps", "1",
        "--dtype", "fp32", "--save_steps", "4", "--keep_last", "10"]
TOTAL = 20  # 2 epochs x 40 samples / 4
BOUND = 1e-6



def start(model, data, save, *extra, ranks: int = 2, launcher=()) -> subprocess.Popen:
    """``scripts/train_sft.sh`` in a process group of its own, as a scheduler starts a job."""
    trace = save.parent / f"{save.name}-trace"
    trace.mkdir(parents=True, exist_ok=True)
    cmd = ["bash", "scripts/train_sft.sh", *(launcher or ["--num_gpus", str(ranks)]), "--model_path", str(model),
           "--data_path", str(data), "--save_path", str(save), *ARGS, *extra]
    env = {**clean_env(), "OMP_NUM_THREADS": "1", "TRAIN_ENTRY": "tests/trace_train.py", "TRACE_DIR": str(trace)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc, timeout=300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def assert_left_the_process_group(save, status: int, ranks: int = 2) -> None:
    """Every rank's ``main`` returned ``status`` with the process group already destroyed (a group left
    to interpreter teardown can abort a rank at exit: docs/results.md, "Exit status")."""
    trace = save.parent / f"{save.name}-trace"
    states = [json.loads((trace / f"exit_rank{r}.json").read_text()) for r in range(ranks)]
    assert states == [{"status": status, "process_group_alive": False}] * ranks, states
    for r in range(ranks):
        (trace / f"exit_rank{r}.json").unlink()  # the next launch writes its own


def weights(save, tag="global_step20"):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(save), tag=tag)


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def steps_seen(save) -> dict[int, list[int]]:
    """{step: the step's sample ids over all ranks, sorted}; a step re-run after a resume overwrites
    the attempt that was cut off."""
    seen: dict[tuple[int, int], list[int]] = {}
    for path in (save.parent / f"{save.name}-trace").glob("samples_rank*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            seen[path.name, row["step"]] = row["ids"]
    steps: dict[int, list[int]] = {}
    for (_, step), ids in seen.items():
        steps.setdefault(step, []).extend(ids)
    return {step: sorted(ids) for step, ids in steps.items()}


def losses(save) -> list[float]:
    rows = [json.loads(line) for line in (save / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def resumable_copy(src, dst, step: int):
    """A copy of a save path (and of its sample-id trace) as it was right after checkpoint ``step``."""
    shutil.copytree(src, dst)
    for tag in dst.glob("global_step*"):
        if int(tag.name.removeprefix("global_step")) > step:
            shutil.rmtree(tag)
    (dst / "latest").write_text(f"global_step{step}")
    trace = dst.parent / f"{dst.name}-trace"
    trace.mkdir()
    for path in (src.parent / f"{src.name}-trace").glob("samples_rank*.jsonl"):
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        (trace / path.name).write_text("".join(row + "\n" for row in rows))
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cluster") / "data.json"
    path.write_text(json.dumps(make_records(40, seed=1)))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data, tmp_path_factory):
    save = tmp_path_factory.mktemp("uninterrupted") / "a"
    code, out, err = finish(start(tiny_model_dir, data, save))
    assert code == 0, err[-3000:]
    assert_left_the_process_group(save, 0)
    assert "2 ranks x 2 accumulation x 1 = batch 4" in out
    assert len(steps_seen(save)) == TOTAL
    return save


def test_sigterm_to_the_job_saves_then_the_resume_equals_the_uninterrupted_run(tiny_model_dir, data, uninterrupted,
                                                                              tmp_path):
    """SIGTERM to the process group of scripts/train_sft.sh (launcher and ranks alike), twice: every
    rank finishes its step, a checkpoint is saved, one line says how to resume, the script exits 0."""
    b = tmp_path / "b"
    proc = start(tiny_model_dir, data, b)
    metrics = b / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 6):
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 6"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # a second signal, likely during the save
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    assert_left_the_process_group(b, 0)
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1, out[-2000:]
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 6 <= step < TOTAL
    assert stopped[0].endswith(
        f"checkpoint {b}/global_step{step}; to continue, run the same command with --resume true")
    assert (b / "latest").read_text() == f"global_step{step}"
    assert not list(b.glob("tmp-*"))

    code, out, err = finish(start(tiny_model_dir, data, b, "--resume", "true"))
    assert code == 0, err[-3000:]
    assert_left_the_process_group(b, 0)
    assert f"starting at {step}" in out
    diff = max_diff(weights(uninterrupted), weights(b))
    print(f"SIGTERM after step {step}, resumed: max abs weight difference {diff:.2e}")
    assert diff <= BOUND
    assert steps_seen(b) == steps_seen(uninterrupted)


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_on_another_world_size_continues_the_same_run(tiny_model_dir, data, uninterrupted, tmp_path, first,
                                                              then):
    """Stopped at step 8 on ``first`` ranks, resumed on ``then``: the same samples in every step, the
    optimizer state carried over (DeepSpeed's universal checkpoint), the weights of the uninterrupted
    2-rank run."""
    if first == 2:
        source = uninterrupted
    else:
        source = tmp_path / "one_rank"
        code, _, err = finish(start(tiny_model_dir, data, source, ranks=1))
        assert code == 0, err[-3000:]
        assert max_diff(weights(uninterrupted), weights(source)) <= BOUND  # world size alone: summation order
    b = resumable_copy(source, tmp_path / "b", step=8)
    code, out, err = finish(start(tiny_model_dir, data, b, "--resume", "true", ranks=then))
    assert code == 0, err[-3000:]
    assert f"(written by {first} ranks) on {then} ranks through DeepSpeed's universal checkpoint format" in out
    assert "starting at 8" in out
    diff = max_diff(weights(uninterrupted), weights(b))
    print(f"{first} ranks to step 8, resumed on {then}: max abs weight difference {diff:.2e}")
    assert diff <= BOUND
    assert steps_seen(b) == steps_seen(uninterrupted)


def test_resume_refuses_another_global_batch_before_building_a_model(tiny_model_dir, data, uninterrupted, tmp_path):
    b = resumable_copy(uninterrupted, tmp_path / "b", step=8)
    code, out, err = finish(start(tiny_model_dir, data, b, "--resume", "true", "--batch_size", "8"), timeout=120)
    assert code == 1
    assert f"cannot resume {b}/global_step8: the data order changed (batch_size 4 -> 8)" in err
    assert "Traceback" not in err and "building" not in out


def test_two_nodes_on_one_machine_train_as_one_node_with_two_ranks(tiny_model_dir, data, uninterrupted, tmp_path):
    """The DeepSpeed launcher's no-ssh mode: each "node" is started by hand with its --node_rank,
    one CPU rank each, on localhost; the same losses and weights as one node with two ranks."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    save, port = tmp_path / "two_nodes", free_port()
    nodes = [start(tiny_model_dir, data, save, launcher=["--hostfile", str(hostfile), "--no_ssh", "--node_rank",
                                                           str(rank), "--num_nodes", "2", "--master_addr",
                                                           "127.0.0.1", "--master_port", str(port)])
             for rank in (0, 1)]
    results = [finish(node) for node in nodes]
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert "2 ranks x 2 accumulation x 1 = batch 4" in results[0][1]
    assert losses(save) == pytest.approx(losses(uninterrupted), abs=1e-6)
    assert max_diff(weights(uninterrupted), weights(save)) <= BOUND
    assert steps_seen(save) == steps_seen(uninterrupted)


def test_a_failed_save_stops_the_run_in_one_line_and_the_last_good_checkpoint_stays(tiny_model_dir, data,
                                                                                   uninterrupted, tmp_path):
    """Checkpoint 8 cannot be written: a file stands where its folder must go (permission bits would
    not stop root, which CI runs as). The run stops with one error line; latest still names
    checkpoint 4, and the next resume finishes the run."""
    b = tmp_path / "b"
    b.mkdir()
    (b / "tmp-global_step8").write_text("in the way")
    code, out, err = finish(start(tiny_model_dir, data, b))
    assert code == 1
    assert_left_the_process_group(b, 1)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"error: checkpoint global_step8 could not be written to {b} (")
    assert errors[0].endswith("; latest still names global_step4")
    assert (b / "latest").read_text() == "global_step4" and not (b / "global_step8").exists()

    (b / "tmp-global_step8").unlink()
    code, out, err = finish(start(tiny_model_dir, data, b, "--resume", "true"))
    assert code == 0, err[-3000:]
    assert_left_the_process_group(b, 0)
    assert "starting at 4" in out
    assert max_diff(weights(uninterrupted), weights(b)) <= BOUND
