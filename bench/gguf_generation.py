"""Generation speed and memory where size shows: PyTorch fp32 against llama.cpp at f32, q8_0, q4_k_m, and the
project's GGUF server.

Usage (from anywhere; ~3-5 minutes on 2 cores, ~3 GB of temp files)::

    .venv/bin/python bench/gguf_generation.py [--threads 2] [--new_tokens 128] [--keep DIR]

What runs: a random-init LLaMA of about 200M parameters (hidden 1024, 16 layers, 16 heads, MLP
2816 and a sentencepiece vocabulary of about 8192, so every weight row is a multiple of 256 and
k-quants apply to all of them) is written as an HF folder, then ``scripts/export_gguf.sh``'s
code makes f32, q8_0 and q4_k_m GGUFs of it. Each engine runs in its own process (so its resident
memory is its own), with ``--threads`` threads, one stream, the clean layout's training prompt, one
warm-up, then ``--new_tokens`` greedy tokens timed (the eos is banned, so every engine makes them all):

* ``pytorch_fp32``: the folder loaded as ``inference.py`` loads it (``model.llama.load_model``, fp32),
  the prompt of ``openalpaca.prompts.prompt_ids``, transformers' ``generate``;
* ``llama_cpp_<type>``: llama-cpp-python's ``Llama.create_completion`` on the same ids (the library bare);
* ``server_q4_k_m``: ``scripts/serve.sh FILE.gguf`` (the project's engine: its tokenizer, guard and
  defaults), one chat request through the HTTP API, timed from sending to the last byte.

Engines are loaded first, then timed in ``--repeat`` rounds, each round running every engine once,
so that on a shared machine all of them meet the same load. tokens/s is generated tokens over wall
time of a timed call, the fastest of an engine's runs (all are listed: the fastest is the least
disturbed); ``rss_mib`` is the process's peak resident memory (``VmHWM``). The last line is JSON,
with the goals' ratios: ``server_vs_pytorch`` (goal >= 7) and ``server_vs_bare_q4_k_m`` (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
    """A sentencepiece BPE of about VOCAB pieces without byte fallback, and a random LLaMA over it.

    Without byte pieces: a random model emits incomplete UTF-8 byte runs, and llama-cpp-python's
    completion loop skips its ``max_tokens`` check while it waits for a character to complete (it
    then runs until the context is full)."""
    import io
    import random

    import sentencepiece as spm

    from demo.tiny import TOKENIZER_CONFIG, llama_config, tokenizer_vocab_size, write_tiny_llama

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(6000)]
    corpus = [" ".join(rng.choice(words) for _ in range(20)) for _ in range(6000)]
    corpus += ["### Input:", "### Instruction:", "### Response:", " ".join(QUESTION)] * 50
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, model_type="bpe", vocab_size=VOCAB, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=False, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=["\n"],
        num_threads=2, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    write_tiny_llama(folder, llama_config(tokenizer_vocab_size(folder), max_position_embeddings=1024, **SHAPE))
    (folder / "train_config.yaml").write_text("layout: clean\ndtype: fp32\n")


def count_params(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def prompt(folder: Path) -> list[int]:
    from model.tokenizer import load_tokenizer
    from openalpaca.prompts import prompt_ids

    return prompt_ids(load_tokenizer(folder), *QUESTION, layout="clean")


def peak_rss_mib(pid: int | str = "self") -> float:
    """The process's peak resident memory (``VmHWM``; ``ru_maxrss`` would count the parent's peak before exec)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return round(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024, 1)


def worker(engine: str, path: Path, threads: int, new_tokens: int, ids: list[int]) -> None:
    """Load the engine, warm it up, print ``ready``; then one timed generation per ``run`` line on stdin
    (a JSON line each), and the peak memory on ``quit``."""
    if engine == "pytorch_fp32":
        import torch

        from model.llama import load_model

        torch.set_num_threads(threads)
        model = load_model(path, "fp32").eval()
        inputs = torch.tensor([ids])
        kwargs = {"do_sample": False, "eos_token_id": 2, "pad_token_id": 0, "attention_mask": torch.ones_like(inputs)}

        def generate(n: int) -> int:
            with torch.no_grad():
                return model.generate(inputs, max_new_tokens=n, min_new_tokens=n, **kwargs).shape[1] - len(ids)
    else:
        import llama_cpp

        llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
        kwargs = {"temperature": 0.0, "top_k": 50, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.0,
                  "logit_bias": {int(k): v for k, v in NO_EOS.items()}}

        def generate(n: int) -> int:
            return llm.create_completion(prompt=ids, max_tokens=n, **kwargs)["usage"]["completion_tokens"]

    generate(8)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            print(json.dumps({"rss_mib": peak_rss_mib()}), flush=True)
            return
        start = time.perf_counter()
        tokens = generate(new_tokens)
        print(json.dumps([time.perf_counter() - start, tokens]), flush=True)


class Worker:
    """An engine in its own process (its memory is its own), driven one timed run at a time."""

    def __init__(self, engine: str, path: Path, args: argparse.Namespace, ids: list[int]):
        self.engine = engine
        cmd = [sys.executable, __file__, "--worker", engine, "--path", str(path), "--threads", str(args.threads),
               "--new_tokens", str(args.new_tokens), "--ids", json.dumps(ids)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        self.read()  # "ready"

    def read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"error: the {self.engine} worker stopped (exit {self.proc.wait()})")
        return line.strip()

    def run(self) -> tuple[float, int]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        seconds, tokens = json.loads(self.read())
        return seconds, tokens

    def quit(self) -> float:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        rss = json.loads(self.read())["rss_mib"]
        self.proc.wait(timeout=60)
        return rss


def summary(runs: list[tuple[float, int]], rss_mib: float) -> dict:
    """The fastest of the timed runs (the least disturbed by other work on the machine), and all of them."""
    seconds, tokens = min(runs)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "all_tokens_per_s": [round(n / s, 1) for s, n in runs], "rss_mib": rss_mib}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``scripts/serve.sh FILE.gguf``: one chat request of --new_tokens tokens per run, through the HTTP API."""

    def __init__(self, path: Path, args: argparse.Namespace, log: Path):
        self.port, self.new_tokens = free_port(), args.new_tokens
        with open(log, "w") as out:
            self.proc = subprocess.Popen(["bash", str(REPO / "scripts" / "serve.sh"), str(path), "--port",
                                          str(self.port), "--threads", str(args.threads)], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.quit()
                    sys.exit(f"error: the server did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.3)
        self.ask(8)

    def ask(self, max_tokens: int) -> tuple[float, int]:
        body = {"messages": [{"role": "user", "content": f"{QUESTION[0]} ### Input: {QUESTION[1]}"}],
                "temperature": 0, "max_tokens": max_tokens, "logit_bias": NO_EOS}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=1800) as response:
            reply = json.loads(response.read())
        return time.perf_counter() - start, reply["usage"]["completion_tokens"]

    def run(self) -> tuple[float, int]:
        return self.ask(self.new_tokens)

    def quit(self) -> float:
        rss = peak_rss_mib(self.proc.pid) if self.proc.poll() is None else 0.0
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        return rss


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every engine (default 2)")
    p.add_argument("--new_tokens", type=int, default=128, help="greedy tokens timed (default 128)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds; each runs every engine once, and an engine's fastest run counts (default 3)")
    p.add_argument("--keep", default=None, help="build the model and GGUFs in this folder and keep them")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.path), args.threads, args.new_tokens, json.loads(args.ids))
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
        engines = {"pytorch_fp32": Worker("pytorch_fp32", folder, args, ids)}
        engines.update({f"llama_cpp_{t}": Worker(f"llama_cpp_{t}", ggufs[t], args, ids) for t in TYPES})
        engines["server_q4_k_m"] = Server(ggufs["q4_k_m"], args, root / "server.log")
        runs: dict[str, list] = {name: [] for name in engines}
        try:
            for _ in range(args.repeat):  # rounds: every engine once per round, so all see the same load
                for name, engine in engines.items():
                    runs[name].append(engine.run())
        finally:
            rss = {name: engine.quit() for name, engine in engines.items()}
        results = {name: summary(runs[name], rss[name]) for name in engines}
        sizes = {t: round(p.stat().st_size / 2**20, 1) for t, p in ggufs.items()}
    speed = {name: r["tokens_per_s"] for name, r in results.items()}
    print(json.dumps({
        "bench": "gguf_generation", "params_m": round(n_params / 1e6, 1), "threads": args.threads,
        "new_tokens": args.new_tokens, "prompt_tokens": len(ids), "engines": results, "gguf_mib": sizes,
        "server_vs_pytorch": round(speed["server_q4_k_m"] / speed["pytorch_fp32"], 2),
        "server_vs_bare_q4_k_m": round(speed["server_q4_k_m"] / speed["llama_cpp_q4_k_m"], 3),
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
