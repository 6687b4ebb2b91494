"""Generation speed and memory where size shows: PyTorch fp32 against llama.cpp at f32, q8_0, q4_k_m, and the
project's GGUF server.

Usage (from anywhere; ~3-5 minutes on 2 cores, ~3 GB of temp files)::

    .venv/bin/python bench/gguf_generation.py [--threads 2] [--new_tokens 128] [--keep DIR]

What runs: a random-init LLaMA of about 200M parameters (hidden 1024, 16 layers, 16 heads, MLP
2816 and a vocabulary of 8192, so every weight row is a multiple of 256 and k-quants apply to all of
them) is written as an HF folder with a small sentencepiece tokenizer, then ``scripts/export_gguf.sh``'s
code makes f32, q8_0 and q4_k_m GGUFs of it. Each engine runs in its own process (so its resident
memory is its own), with ``--threads`` threads, one stream, the clean layout's training prompt, one
warm-up, then ``--new_tokens`` greedy tokens timed (the eos is banned, so every engine makes them all):

* ``pytorch_fp32``: the folder loaded as ``inference.py`` loads it (``model.llama.load_model``, fp32),
  the prompt of ``openalpaca.prompts.prompt_ids``, transformers' ``generate``;
* ``llama_cpp_<type>``: llama-cpp-python's ``Llama.create_completion`` on the same ids (the library bare);
* ``server_q4_k_m``: ``scripts/serve.sh FILE.gguf`` (the project's engine: its tokenizer, guard and
  defaults), one chat request through the HTTP API, timed from sending to the last byte.

tokens/s is generated tokens over wall time of the timed call; ``rss_mib`` is the process's peak resident
memory (``ru_maxrss``; ``VmHWM`` for the server). The last line is JSON, with the goals' ratios:
``server_vs_pytorch`` (goal >= 7) and ``server_vs_bare_q4_k_m`` (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = {"hidden_size": 1024, "num_layers": 16, "num_heads": 16, "intermediate_size": 2816}
VOCAB = 8192
QUESTION = ("Summarise the text.", "Alpacas are camelids from South America, smaller than llamas.")
TYPES = ("f32", "q8_0", "q4_k_m")
NO_EOS = {"2": -100.0}  # the eos banned: every engine makes exactly --new_tokens tokens


def make_model(folder: Path) -> None:
    from demo.tiny import llama_config, train_tokenizer, write_tiny_llama

    train_tokenizer(["summarise the text alpacas are camelids from south america smaller than llamas"] * 40,
                    folder, vocab_size=300)
    write_tiny_llama(folder, llama_config(VOCAB, max_position_embeddings=1024, **SHAPE))
    (folder / "train_config.yaml").write_text("layout: clean\ndtype: fp32\n")


def count_params(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def prompt(folder: Path) -> list[int]:
    from model.tokenizer import load_tokenizer
    from openalpaca.prompts import prompt_ids

    return prompt_ids(load_tokenizer(folder), *QUESTION, layout="clean")


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def worker(engine: str, path: Path, threads: int, new_tokens: int, ids: list[int]) -> dict:
    if engine == "pytorch_fp32":
        import torch

        from model.llama import load_model

        torch.set_num_threads(threads)
        model = load_model(path, "fp32").eval()
        inputs = torch.tensor([ids])
        kwargs = {"do_sample": False, "eos_token_id": 2, "pad_token_id": 0, "attention_mask": torch.ones_like(inputs)}
        with torch.no_grad():
            model.generate(inputs, max_new_tokens=8, min_new_tokens=8, **kwargs)
            start = time.perf_counter()
            out = model.generate(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            seconds = time.perf_counter() - start
        tokens = out.shape[1] - len(ids)
    else:
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
        kwargs = {"temperature": 0.0, "top_k": 50, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0,
                  "logit_bias": {int(k): v for k, v in NO_EOS.items()}}
        llm.create_completion(prompt=ids, max_tokens=8, **kwargs)
        start = time.perf_counter()
        tokens = llm.create_completion(prompt=ids, max_tokens=new_tokens, **kwargs)["usage"]["completion_tokens"]
        seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "rss_mib": peak_rss_mib()}


def run_worker(engine: str, path: Path, args: argparse.Namespace, ids: list[int]) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--path", str(path), "--threads", str(args.threads),
           "--new_tokens", str(args.new_tokens), "--ids", json.dumps(ids)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        sys.exit(f"error: the {engine} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(path: Path, args: argparse.Namespace, log: Path) -> dict:
    """One chat request of --new_tokens tokens through scripts/serve.sh FILE.gguf, after a warm-up."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "serve.sh"), str(path), "--port", str(port),
                                 "--threads", str(args.threads)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"error: the server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.3)

        def ask(max_tokens: int) -> tuple[float, int]:
            body = {"messages": [{"role": "user", "content": f"{QUESTION[0]} ### Input: {QUESTION[1]}"}],
                    "temperature": 0, "max_tokens": max_tokens, "logit_bias": NO_EOS}
            request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"content-type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=600) as response:
                reply = json.loads(response.read())
            return time.perf_counter() - start, reply["usage"]["completion_tokens"]

        ask(8)
        seconds, tokens = ask(args.new_tokens)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                "rss_mib": round(hwm / 1024, 1)}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every engine (default 2)")
    p.add_argument("--new_tokens", type=int, default=128, help="greedy tokens timed (default 128)")
    p.add_argument("--keep", default=None, help="build the model and GGUFs in this folder and keep them")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.path), args.threads, args.new_tokens, json.loads(args.ids))))
        return 0
    from model.gguf import export_gguf

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        folder = root / "llama200m"
        if not (folder / "model.safetensors").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            make_model(folder)
        n_params = count_params(folder)
        ggufs = {t: root / f"llama200m-{t}.gguf" for t in TYPES}
        missing = [t for t, p in ggufs.items() if not p.is_file()]
        if missing:
            export_gguf(folder, out=str(root / "llama200m-{type}.gguf"), types=missing, layout="clean", overwrite=True)
        ids = prompt(folder)
        engines = {"pytorch_fp32": run_worker("pytorch_fp32", folder, args, ids)}
        for t in TYPES:
            engines[f"llama_cpp_{t}"] = run_worker(f"llama_cpp_{t}", ggufs[t], args, ids)
            print(json.dumps({t: engines[f"llama_cpp_{t}"]}), file=sys.stderr)
        engines["server_q4_k_m"] = run_server(ggufs["q4_k_m"], args, root / "server.log")
        sizes = {t: round(p.stat().st_size / 2**20, 1) for t, p in ggufs.items()}
    speed = {name: e["tokens_per_s"] for name, e in engines.items()}
    print(json.dumps({
        "bench": "gguf_generation", "params_m": round(n_params / 1e6, 1), "threads": args.threads,
        "new_tokens": args.new_tokens, "prompt_tokens": len(ids), "engines": engines, "gguf_mib": sizes,
        "server_vs_pytorch": round(speed["server_q4_k_m"] / speed["pytorch_fp32"], 2),
        "server_vs_bare_q4_k_m": round(speed["server_q4_k_m"] / speed["llama_cpp_q4_k_m"], 3),
        "load_average_at_start": [round(x, 2) for x in load]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
