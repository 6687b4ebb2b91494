"""train_sft.py end to end on CPU, ZeRO-3 on 1 rank (2 ranks through the launcher: test_resume.py)."""

import json
import re
import sys
from collections import Counter

import pytest
import yaml

from openalpaca.config import parse_zero_overrides
from tests.conftest import REPO, run
from tests.exact_tokenizer import assert_exact_tokenizer

pytestmark = pytest.mark.slow  # launcher runs and child processes

LOSS = re.compile(r"^step (\d+)/(\d+) epoch \d+ loss ([\d.]+)", re.M)
FAST = ["--epochs", "3", "--batch_size", "8", "--lr", "5e-3", "--warmup_steps", "1", "--dtype", "fp32"]


def losses(stdout: str) -> list[float]:
    return [float(m[2]) for m in LOSS.findall(stdout)]


def assert_checkpoint(save, steps: int) -> dict:
    tag = f"global_step{steps}"
    assert (save / "latest").read_text() == tag
    assert (save / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()
    for name in ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "train_config.yaml", "ds_config.json", "zero_to_fp32.py"]:
        assert (save / name).is_file(), name
    assert (save / "zero_to_fp32.py").read_text() == (REPO / "scripts" / "zero_to_fp32.py").read_text()
    resolved = yaml.safe_load((save / "train_config.yaml").read_text())
    assert_exact_tokenizer(save, resolved["layout"])
    generation = json.loads((save / "generation_config.json").read_text())
    assert {k: generation.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "top_k",
                                           "top_p", "max_new_tokens")} == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "top_k": 50, "top_p": 0.9,
        "max_new_tokens": 128}  # the original's sampling
    return resolved


def test_one_rank_zero3_loss_goes_down_with_eval_logs_and_plot(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    """Also: a lock left by a killed build of DeepSpeed's CPU shared-memory op does not hang the start.

    Nothing is compiled at all (openalpaca/distributed.py): the extensions folder stays as it was.
    """
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    save = tmp_path / "out"
    cmd = [sys.executable, "train_sft.py", "--model_path", str(tiny_model_dir), "--data_path", str(alpaca_file),
           "--save_path", str(save), "--micro_batch_size", "4", "--eval_ratio", "0.25", "--eval_steps", "5", *FAST]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(proc.stdout)
    assert len(curve) == 13  # 3 epochs x 36 // 8 (the original's count): 12 of the 48 records are held out
    assert curve[-1] < curve[0] - 1.0, curve
    assert "36 samples (0 skipped" in proc.stdout and "12 eval samples" in proc.stdout
    assert "1 ranks x 2 accumulation x 4 = batch 8" in proc.stdout
    evals = [float(x) for x in re.findall(r"^step (?:5|10|13)/13 eval loss ([\d.]+)$", proc.stdout, re.M)]
    assert len(evals) == 3 and evals[-1] < evals[0], evals
    resolved = assert_checkpoint(save, 13)
    assert resolved["lr"] == 5e-3 and resolved["micro_batch_size"] == 4
    assert list((save / "logs").glob("events.out.tfevents.*"))
    assert (save / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = proc.stdout.splitlines()[-2]
    assert summary.startswith("done: 13 steps") and "eval loss" in summary and "loss.png" in summary
    # In a log file (stderr is not a terminal) the bar is drawn at its start, at its end and at most once a
    # minute between: never once more for each logged step.
    drawn = Counter(re.findall(r"train:\s+\d+%\|[^|]*\|\s*(\d+)/13", proc.stderr))
    assert drawn["0"] == 1 and drawn["13"] == 1 and max(drawn.values()) == 1, drawn
    assert sorted(p.name for p in extensions.rglob("*")) == ["deepspeed_shm_comm", "lock"]


TRAINER_BAD_INPUT = [
    (["--batch_size", "7"], "batch_size 7 is not divisible by micro_batch_size 2 x world size 1 = 2; "
                            "pick a batch_size that is a multiple of 2"),
    (["--model_path", "./no_such_model"], "./no_such_model: model folder not found (see openllama_ckpt/README.md)"),
    (["--data_path", "./no_such.json"], "no_such.json: no such file"),
    (["--config", "nothere.yaml"], "nothere.yaml: config file not found"),
    (["--layout", "foo"], "config/openllama.yaml: layout must be one of original, clean, got 'foo'"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--nope", "3"], "unrecognized arguments: --nope 3"),
    (["--save_path", "{tmp}/afile/out"], "{tmp}/afile/out: save path cannot be made, {tmp}/afile is not a directory"),
]


@pytest.mark.parametrize("args, message", TRAINER_BAD_INPUT)
def test_bad_input_fails_before_any_model_is_built(tiny_model_dir, alpaca_file, tmp_path, args, message):
    """Exactly one line on stderr (no usage block, warning or traceback), exit 1, nothing written;
    the save path's parent is a regular file in the last case, which fails for root too."""
    (tmp_path / "afile").write_text("a regular file\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    cmd = [sys.executable, "train_sft.py", "--model_path", str(tiny_model_dir), "--data_path", str(alpaca_file),
           "--save_path", str(tmp_path / "out"), "--micro_batch_size", "2", *[a.format(tmp=tmp_path) for a in args]]
    proc = run(cmd, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"error: {message.format(tmp=tmp_path)}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, nothing else
    assert (tmp_path / "afile").read_text() == "a regular file\n"


def test_demo_throughput_settings_change_nothing_but_the_speed(tiny_model_dir, alpaca_file, tmp_path):
    """config/demo.yaml's speed settings (packing, whole layers gathered at once, zero_overrides) give the
    same loss curve as padded micro-batches with plain ZeRO-3."""
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    assert demo["pack"] and demo["zero3_leaf_modules"] and demo["zero_overrides"]
    common = [sys.executable, "train_sft.py", "--model_path", str(tiny_model_dir), "--data_path", str(alpaca_file),
              "--gradient_checkpointing", "false", *FAST, "--epochs", "1"]
    plain = run([*common, "--save_path", str(tmp_path / "plain"), "--micro_batch_size", "4"])
    fast = run([*common, "--save_path", str(tmp_path / "fast"), "--pack", "true",
                "--micro_batch_size", str(demo["micro_batch_size"]),
                "--max_tokens_per_micro_batch", str(demo["max_tokens_per_micro_batch"]),
                "--zero3_leaf_modules", demo["zero3_leaf_modules"], "--zero_overrides", demo["zero_overrides"]])
    assert plain.returncode == 0 and fast.returncode == 0, (plain.stderr[-2000:], fast.stderr[-2000:])
    assert "packed into rows of up to" in fast.stdout and "tokens processed (0 padding)" in fast.stdout
    assert len(losses(plain.stdout)) == 6
    assert losses(fast.stdout) == pytest.approx(losses(plain.stdout), abs=1e-4)
    written = json.loads((tmp_path / "fast" / "ds_config.json").read_text())["zero_optimization"]
    assert written.items() >= parse_zero_overrides(demo["zero_overrides"]).items()
    bad = run([*common, "--save_path", str(tmp_path / "bad"), "--zero3_leaf_modules", "LlamaDecoderLayer,Nope"])
    assert bad.returncode == 1
    assert "zero3_leaf_modules: the model has no module class Nope (it has " in bad.stderr
