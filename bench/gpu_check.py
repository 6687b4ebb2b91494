"""The real trainer end to end on one device, in one command: train, convert, export, load, answer.

    python bench/gpu_check.py                 # one GPU: a ~1B LLaMA, bf16, the fast recipe; a few minutes
    python bench/gpu_check.py --tiny          # the same steps on CPU at tiny size (tests/test_gpu_check.py)

1. Writes a random-init LLaMA (hidden 2048, 16 layers, vocabulary 32000; ``--tiny``: hidden 64,
   2 layers), a sentencepiece tokenizer trained on the spot, and dolly-like synthetic Alpaca
   records (``bench/throughput.py``'s length mix; no real text).
2. Trains with ``scripts/train_sft.sh --num_gpus 1 --config config/openllama_fast.yaml`` (ZeRO-3,
   packing, bf16 on a GPU, fp32 on CPU) for one epoch, through ``bench/probe_train.py`` so the
   engine's own logits on a fixed probe are saved at the end. Prints the trainer's tokens/s and
   MFU, from ``logs/summary.json``: model FLOPs as ``bench/mfu.py`` counts them (``6 N_body`` per
   token, causal attention per sample, the LM head on scored positions) over the training loop's
   wall time, over ``--peak_tflops``.
3. Runs ``scripts/export_hf.sh``, then the seed's ``python SAVE/zero_to_fp32.py SAVE
   SAVE/pytorch_model.bin`` and ``scripts/make_shards.sh SAVE``; loads both folders with
   ``from_pretrained`` on the device and compares their logits on the probe with the engine's:
   fp32 within ``1e-4 x max|logit|`` (summation order only), bf16 within ``2^-6 x max|logit|``
   (the exported weights are the engine's bf16 weights; kernels may differ).
4. Answers three prompts with ``inference.py --greedy`` from the sharded folder.

The last line is ``gpu check: ok``, or ``gpu check: FAILED at <step>: <reason>``; the line before
it is JSON. On a GPU machine without DeepSpeed, carry it as a wheel (it is a pure-Python build here:
``pip wheel --no-deps deepspeed==0.19.8``) and set ``DS_BUILD_OPS=0``: the JSON's ``torch_adam``
keeps every op build off the path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

SHAPES = {
    "gpu": {"hidden_size": 2048, "num_layers": 16, "num_heads": 16, "intermediate_size": 5632},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
}
PROMPTS = [("What is an alpaca?", ""), ("Summarise the text.", "Alpacas are kept for their wool."),
           ("Name three colours.", "")]


class CheckFailed(RuntimeError):
    pass


def sh(step: str, cmd: list[str], env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, check=False, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise CheckFailed(f"{step}: exit {proc.returncode}: {tail}")
    return proc.stdout


def build(work: Path, tiny: bool, n_records: int) -> tuple[Path, Path, int]:
    """The base model folder and the data file; returns them and the model's parameter count."""
    from throughput import dolly_like_records

    from demo.tiny import llama_config, tokenizer_vocab_size, train_tokenizer, write_tiny_llama

    records = dolly_like_records(n_records, 0)
    data = work / "data.json"
    data.write_text(json.dumps(records))
    base = work / "base"
    texts = [" ".join(r.values()) for r in records[:2000]]
    train_tokenizer(texts, base, vocab_size=1000 if tiny else 4000)
    vocab = tokenizer_vocab_size(base) if tiny else 32000
    config = llama_config(vocab, max_position_embeddings=2048, **SHAPES["tiny" if tiny else "gpu"])
    write_tiny_llama(base, config)
    h, inter = config.hidden_size, config.intermediate_size
    return base, data, config.num_hidden_layers * (4 * h * h + 3 * h * inter + 2 * h) + 2 * vocab * h + h


def model_flops(base: Path, data: Path, summary: dict) -> float:
    """FLOPs of the training loop, counted as bench/mfu.py counts a step."""
    from transformers import LlamaConfig

    from model.tokenizer import load_tokenizer
    from openalpaca.data import SFTDataset, read_alpaca
    from openalpaca.prompts import SampleFormat

    config = LlamaConfig.from_pretrained(base)
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    n_body = layers * (4 * h * h + 3 * h * inter + 2 * h)
    fmt = SampleFormat("clean", "keep_prompt")
    dataset = SFTDataset.from_records(read_alpaca(data), load_tokenizer(base), 1024, fmt)
    attention = sum(6 * layers * h * len(s.input_ids) ** 2 for s in dataset.samples)
    return 6 * n_body * summary["tokens_processed"] + attention + 6 * h * vocab * summary["supervised_tokens"]


def compare(folder: Path, probe: dict, device: str, dtype: str) -> float:
    """Max |logit difference| of ``folder`` against the engine's, over the engine's max |logit|."""
    from model.llama import load_model

    model = load_model(folder, dtype).to(device).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"].to(device)).logits.float().cpu()
    return float((logits - probe["logits"]).abs().max() / probe["logits"].abs().max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (what the test suite runs)")
    p.add_argument("--records", type=int, default=0, help="training records (default: 2048, tiny: 256)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    p.add_argument("--work_dir", default="", help="keep everything here (default: a temporary folder)")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device, dtype = ("cuda", "bf16") if cuda else ("cpu", "fp32")
    env = {"DS_ACCELERATOR": "cuda" if cuda else "cpu", "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    step = "setup"
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work_dir or tmp)
        shutil.rmtree(work / "save", ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        try:
            step = "1 model and data"
            base, data, n_params = build(work, args.tiny, args.records or (256 if args.tiny else 2048))
            result["params"] = n_params

            step = "2 train"
            save, probe_file = work / "save", work / "probe.pt"
            sh(step, ["bash", "scripts/train_sft.sh", "--num_gpus", "1", "--config", "config/openllama_fast.yaml",
                      "--model_path", str(base), "--data_path", str(data), "--save_path", str(save), "--epochs", "1",
                      "--dtype", dtype, "--lr", "1e-3", "--logging_steps", "1000"],
               {**env, "TRAIN_ENTRY": "bench/probe_train.py", "PROBE_OUT": str(probe_file)})
            summary = json.loads((save / "logs" / "summary.json").read_text())
            tflops = model_flops(base, data, summary) / summary["train_seconds"] / 1e12
            result.update(steps=summary["steps"], train_seconds=round(summary["train_seconds"], 2),
                          tokens_per_s=round(summary["tokens_processed"] / summary["train_seconds"]),
                          model_tflops=round(tflops, 2), mfu=round(tflops / args.peak_tflops, 3) if cuda else None,
                          final_loss=round(summary["final_loss"], 4))
            probe = torch.load(probe_file, weights_only=True)

            step = "3 export and convert"
            hf = work / "hf"
            sh(step, ["bash", "scripts/export_hf.sh", str(save), str(hf)], env)
            sh(step, [sys.executable, str(save / "zero_to_fp32.py"), str(save), str(save / "pytorch_model.bin")], env)
            sh(step, ["bash", "scripts/make_shards.sh", str(save)], env)
            bound = 2**-6 if dtype == "bf16" else 1e-4
            result["logit_diff"] = {"export_hf": compare(hf, probe, device, dtype),
                                    "zero_to_fp32_make_shards": compare(save, probe, device, dtype)}
            result["logit_bound"] = bound
            worst = max(result["logit_diff"].values())
            if not worst <= bound:
                raise CheckFailed(f"{step}: exported logits differ from the engine's by {worst:.2e} "
                                  f"(relative), over the bound {bound:.1e}")

            step = "4 inference"
            questions = work / "questions.jsonl"
            questions.write_text("".join(json.dumps({"instruction": i, "input": c}) + "\n" for i, c in PROMPTS))
            started = time.time()
            sh(step, [sys.executable, "inference.py", "--model_path", str(save), "--input_file", str(questions),
                      "--output_file", str(work / "answers.jsonl"), "--greedy", "--max_new_tokens", "16",
                      "--dtype", dtype, "--device", device], env)
            answers = [json.loads(line)["generated"] for line in (work / "answers.jsonl").read_text().splitlines()]
            if len(answers) != len(PROMPTS):
                raise CheckFailed(f"{step}: {len(answers)} answers for {len(PROMPTS)} prompts")
            result["inference_seconds"] = round(time.time() - started, 1)
        except CheckFailed as err:
            print(json.dumps(result))
            print(f"gpu check: FAILED at {err}")
            return 1
    print(json.dumps(result))
    print("gpu check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
