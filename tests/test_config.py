"""The typed config: YAML + CLI, and the DeepSpeed JSON derived from it."""

import json
import re
from pathlib import Path

import pytest
import yaml

from openalpaca.config import (
    ConfigError,
    TrainConfig,
    load_config,
    load_ds_config,
    load_yaml,
    resolve_ds_config,
)

REPO = Path(__file__).resolve().parents[1]
SEED_DS = load_ds_config(REPO / "dsconfig" / "openllama.json")


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(["--config", str(path)])
    resolve_ds_config(load_ds_config(REPO / cfg.ds_config), cfg, world_size=2, total_steps=10)


def test_seed_hyper_parameters():
    cfg = load_config(["--config", str(REPO / "config" / "openllama.yaml")])
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.max_length, cfg.dtype) == (64, 2e-5, 2, 1024, "bf16")
    ds = resolve_ds_config(SEED_DS, cfg, world_size=8, total_steps=470)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.001
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize("world_size, gas", [(1, 64), (2, 32), (8, 8)])
def test_accumulation_is_derived_from_the_world_size(world_size, gas):
    ds = resolve_ds_config(SEED_DS, TrainConfig(), world_size=world_size, total_steps=470)
    assert ds["gradient_accumulation_steps"] == gas
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["optimizer"]["params"]["lr"] == ds["scheduler"]["params"]["warmup_max_lr"] == 2e-5
    assert ds["scheduler"]["params"]["total_num_steps"] == 470


def test_total_steps_come_from_data_size_and_epochs():
    from openalpaca.data import total_steps

    assert total_steps(15011, 2, 64, "pad") == 2 * 235  # the last, partial step of each epoch is kept
    assert total_steps(15011, 2, 64, "carry") == 30022 // 64 == 469  # the original's epochs * N // 64
    assert total_steps(128, 1, 64, "pad") == total_steps(128, 1, 64, "carry") == 2


def test_warmup_is_the_originals_and_fills_the_json():
    cfg = TrainConfig()
    assert cfg.warmup(469) == max(10, int(0.1 * 469)) == 46 and cfg.warmup(60) == 10 and cfg.warmup(5) == 10
    ds = resolve_ds_config(SEED_DS, cfg, world_size=8, total_steps=469)
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 46
    assert ds["scheduler"]["params"]["warmup_type"] == "log"
    fast = TrainConfig(warmup_type="linear", warmup_ratio=0.0, warmup_steps=30)
    assert resolve_ds_config(SEED_DS, fast, 8, 469)["scheduler"]["params"]["warmup_num_steps"] == 30


def test_a_batch_the_world_cannot_divide_fails_clearly():
    with pytest.raises(ConfigError, match="batch_size 64 is not divisible by .* world size 3"):
        resolve_ds_config(SEED_DS, TrainConfig(), world_size=3, total_steps=10)


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda ds: ds.update(train_batch_size=128), "train_batch_size"),
        (lambda ds: ds.update(gradient_accumulation_steps=4), "gradient_accumulation_steps"),
        (lambda ds: ds["optimizer"]["params"].update(lr=1e-4), "optimizer.params.lr"),
        (lambda ds: ds["scheduler"]["params"].update(total_num_steps=7), "scheduler.params.total_num_steps"),
        (lambda ds: ds["bf16"].update(enabled=False), "bf16.enabled"),
    ],
)
def test_a_ds_json_that_disagrees_fails_naming_file_and_key(edit, key):
    ds = json.loads(json.dumps(SEED_DS))
    edit(ds)
    with pytest.raises(ConfigError, match=rf"my\.json disagrees .*{key}"):
        resolve_ds_config(ds, TrainConfig(), world_size=1, total_steps=470, path="my.json")


def test_explicit_values_that_agree_are_accepted():
    ds = json.loads(json.dumps(SEED_DS))
    ds.update(train_batch_size=64, gradient_accumulation_steps=32)
    ds["optimizer"]["params"]["lr"] = 2e-5
    assert resolve_ds_config(ds, TrainConfig(), world_size=2, total_steps=470)["gradient_accumulation_steps"] == 32


def test_cli_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"epochs": 3, "lr": 1e-3}))
    cfg = load_config(["--config", str(path), "--lr", "5e-4", "--gradient_checkpointing", "false"])
    assert (cfg.epochs, cfg.lr, cfg.gradient_checkpointing) == (3, 5e-4, False)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"epoch": 2}, r"unknown key\(s\) epoch"),
        ({"epochs": "two"}, r"'epochs' must be int"),
        ({"epochs": True}, r"'epochs' must be int"),
        ({"lr": "fast"}, r"'lr' must be float"),
        ({"dtype": "fp8"}, r"dtype must be one of"),
        ({"batch_size": 0}, r"batch_size must be >= 1"),
    ],
)
def test_bad_yaml_fails_naming_file_and_key(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(["--config", str(path)])
    assert "bad.yaml" in str(err.value)


def test_integer_lr_in_yaml_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\n")
    assert load_yaml(path) == {"lr": 1.0}


def test_lora_block_in_yaml(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("lora:\n  r: 8\n  alpha: 32\n  target_modules: [q_proj, v_proj]\n")
    cfg = load_config(["--config", str(path), "--lora_dropout", "0.1"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules) == (8, 32, 0.1, "q_proj,v_proj")
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"lora\.yaml: unknown key lora\.rank"):
        load_config(["--config", str(path)])


def test_zero_overrides_go_into_the_ds_json_and_nothing_else_changes():
    cfg = TrainConfig(zero_overrides="overlap_comm=false, stage3_param_persistence_threshold=0,"
                                     " stage3_use_all_reduce_for_fetch_params=true")
    ds = resolve_ds_config(SEED_DS, cfg, world_size=8, total_steps=470)
    plain = resolve_ds_config(SEED_DS, TrainConfig(), world_size=8, total_steps=470)
    zero, plain_zero = ds.pop("zero_optimization"), plain.pop("zero_optimization")
    assert ds == plain
    assert zero == {**plain_zero, "overlap_comm": False, "stage3_param_persistence_threshold": 0,
                    "stage3_use_all_reduce_for_fetch_params": True}
    assert SEED_DS["zero_optimization"]["overlap_comm"] is True  # the loaded JSON is not edited in place


@pytest.mark.parametrize(
    "text, message",
    [
        ("overlap_comm", r"'overlap_comm' is not KEY=VALUE"),
        ("overlap_comm=no", r"'overlap_comm=no' is not KEY=VALUE"),
        ("=1", r"'=1' is not KEY=VALUE"),
        ("stage=2", r"the ZeRO stage belongs in the DeepSpeed JSON"),
    ],
)
def test_malformed_zero_overrides_fail_naming_the_item(tmp_path, text, message):
    path = tmp_path / "z.yaml"
    path.write_text(yaml.safe_dump({"zero_overrides": text}))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(["--config", str(path)])
    assert "z.yaml" in str(err.value)


def test_a_zero_override_deepspeed_does_not_know_fails_before_training():
    with pytest.raises(ConfigError, match=r"zero_overrides: DeepSpeed has no zero_optimization setting overlap_com\b"):
        resolve_ds_config(SEED_DS, TrainConfig(zero_overrides="overlap_com=false"), world_size=1, total_steps=10)


def test_default_config_is_the_original_recipe():
    """config/openllama.yaml, as written, holds the original code's choices (README: what is the same)."""
    cfg = load_config(["--config", str(REPO / "config" / "openllama.yaml")])
    assert (cfg.layout, cfg.truncation, cfg.hide_eos_keys, cfg.loss_weighting, cfg.epoch_tail) == (
        "original", "keep_end", True, "sample", "carry")
    assert (cfg.warmup_steps, cfg.warmup_ratio, cfg.warmup_type, cfg.gradient_checkpointing) == (10, 0.1, "log", False)
    assert (cfg.epochs, cfg.max_length, cfg.batch_size, cfg.micro_batch_size, cfg.lr) == (2, 1024, 64, 1, 2e-5)
    assert not cfg.pack and not cfg.lora_r
    fast = load_config(["--config", str(REPO / "config" / "openllama_fast.yaml")])
    assert (fast.layout, fast.truncation, fast.hide_eos_keys, fast.loss_weighting, fast.epoch_tail, fast.pack) == (
        "clean", "keep_prompt", False, "token", "pad", True)


@pytest.mark.parametrize("key, value, message", [
    ("layout", "alpaca", "layout must be one of original, clean, got 'alpaca'"),
    ("truncation", "left", "truncation must be one of keep_end, keep_prompt, got 'left'"),
    ("loss_weighting", "mean", "loss_weighting must be one of sample, token, got 'mean'"),
    ("epoch_tail", "drop", "epoch_tail must be one of pad, carry, got 'drop'"),
    ("warmup_type", "cosine", "warmup_type must be one of log, linear, got 'cosine'"),
])
def test_unknown_recipe_values_fail_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(["--config", str(REPO / "config" / "openllama.yaml"), f"--{key}", value])
