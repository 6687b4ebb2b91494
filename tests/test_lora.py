"""LoRA: trains on the frozen ZeRO-3 base, saves a peft adapter, and the export merges it."""

import sys

import pytest
import torch
from peft import PeftModel

from model.llama import load_model
from tests.conftest import run

pytestmark = pytest.mark.slow  # launcher runs and child processes

ARGS = ["--epochs", "2", "--batch_size", "8", "--micro_batch_size", "8", "--lr", "1e-2", "--warmup_steps", "1",
        "--dtype", "fp32", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj,v_proj,down_proj"]


def test_lora_trains_saves_an_adapter_and_exports_merged_weights(tiny_model_dir, alpaca_file, tmp_path):
    save, merged = tmp_path / "lora", tmp_path / "merged"
    proc = run([sys.executable, "train_sft.py", "--model_path", str(tiny_model_dir), "--data_path", str(alpaca_file),
                "--save_path", str(save), *ARGS])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (save / "adapter" / "adapter_config.json").is_file()
    proc = run(["bash", "scripts/export_hf.sh", str(save), str(merged)])
    assert proc.returncode == 0, proc.stderr[-3000:]

    base = load_model(tiny_model_dir, "fp32")
    adapter = PeftModel.from_pretrained(load_model(tiny_model_dir, "fp32"), save / "adapter").eval()
    exported = load_model(merged, "fp32").eval()
    ids = torch.tensor([[1, 5, 9, 14, 2, 1, 30, 7]])
    with torch.no_grad():
        base_logits, adapter_logits, merged_logits = (m(input_ids=ids).logits for m in (base, adapter, exported))
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter learned something
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
