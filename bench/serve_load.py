"""Concurrent clients against ``scripts/serve.sh``: requests/s, tokens/s and latency for 1 and 8 clients.

Usage (from anywhere; ~2-4 minutes on 2 cores with the demo's model)::

    .venv/bin/python bench/serve_load.py [--model ckpt/demo/openalpaca] [--clients 1 8] [--requests 16]
                                         [--new_tokens 32] [--no_continuous_batching]
                                         [--engine transformers llama.cpp] [--gguf_type q8_0]

What runs: ``scripts/serve.sh MODEL`` (transformers serve behind the request guard, on CPU), once
as it comes and once with ``--continuous_batching``; with ``--engine llama.cpp`` also (or only)
``scripts/serve.sh MODEL.gguf`` (llama-cpp-python's server behind the same guard), on a GGUF of
MODEL that ``scripts/export_gguf.sh``'s code writes to a temp folder (``--gguf_type``; or MODEL
itself when it is a ``.gguf``). Against each, the same ``--requests`` chat requests are sent by 1
client, then by 8 at once (each client sends its share one after the other, with the ``openai``
client), after one warm-up request. Every request is greedy and makes ``--new_tokens`` tokens:
for transformers its ``generation_config`` (transformers serve's own request field) names
``<unk>``, an id training never targets, as the eos, because continuous batching ignores
``min_new_tokens``; for llama.cpp a ``logit_bias`` bans the eos. So every run does the same work
whatever the model answers (the tokens counted are the server's ``usage``). The prompts are the
demo's kinds of instructions, with and without an input. llama-cpp-python's server answers one
request at a time (a lock around its one model), so 8 clients there queue.

Per run: requests/s and generated tokens/s (``usage.completion_tokens`` summed) over the wall time
of the run, and the p50/p95 latency of a request (sent to last byte). ``speedup`` is the 8-client
run's tokens/s over the 1-client run's, per server: the gain of concurrency, from one run. The
last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPTS = [
    "Repeat the words. ### Input: red plum fig",
    "Say the first word. ### Input: one two three",
    "Name a fruit.",
    "Sort the words alphabetically. ### Input: pear apple mango",
    "What is the sum of the numbers? ### Input: 3 4",
    "Count the words. ### Input: blue green white black",
    "Give the last word. ### Input: kiwi lime date",
    "Write the words in reverse order. ### Input: one two three four",
]
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, flags: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = ["bash", str(REPO / "scripts" / "serve.sh"), model, "--port", str(port), *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: scripts/serve.sh exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    sys.exit(f"error: the server did not answer within {START_TIMEOUT_S}s:\n{log.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def request_fn(url: str, new_tokens: int, engine: str):
    """One greedy chat request of exactly ``new_tokens`` tokens; returns (latency_s, completion_tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    if engine == "llama.cpp":
        extra = {"temperature": 0, "logit_bias": {"2": -100.0}}  # the eos banned
    else:  # eos is <unk> (0), which training never targets: continuous batching ignores min_new_tokens
        extra = {"extra_body": {"generation_config": json.dumps({
            "do_sample": False, "max_new_tokens": new_tokens, "bos_token_id": 1, "eos_token_id": 0,
            "pad_token_id": 0})}}

    def ask(prompt: str) -> tuple[float, int]:
        start = time.perf_counter()
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=new_tokens, **extra)
        return time.perf_counter() - start, reply.usage.completion_tokens

    return ask


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_run(ask, clients: int, requests: int) -> dict:
    """``requests`` requests shared by ``clients`` threads, each sending its share in turn."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    shares = [prompts[c::clients] for c in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for share in pool.map(lambda share: [ask(p) for p in share], shares) for r in share]
    wall = time.perf_counter() - start
    latencies = [latency for latency, _ in results]
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": requests, "wall_s": round(wall, 3),
            "requests_per_s": round(requests / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "p50_latency_s": round(statistics.median(latencies), 3),
            "p95_latency_s": round(percentile(latencies, 0.95), 3)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ckpt/demo/openalpaca", help="model folder (default: the CPU demo's)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients per run (default 1 8)")
    p.add_argument("--requests", type=int, default=16, help="requests per run, shared by its clients (default 16)")
    p.add_argument("--new_tokens", type=int, default=32, help="tokens each request generates (default 32)")
    p.add_argument("--no_continuous_batching", action="store_true", help="skip the --continuous_batching server")
    p.add_argument("--engine", nargs="+", choices=["transformers", "llama.cpp"], default=["transformers"],
                   help="servers to load (default transformers): transformers serve, llama-cpp-python on a GGUF")
    p.add_argument("--gguf_type", default="q8_0", help="GGUF type exported for the llama.cpp engine (default q8_0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    is_gguf = args.model.endswith(".gguf")
    if not (Path(args.model).is_file() if is_gguf else Path(args.model).is_dir()):
        sys.exit(f"error: {args.model}: model not found (bash scripts/demo.sh writes ckpt/demo/openalpaca)")
    if is_gguf and "transformers" in args.engine:
        sys.exit(f"error: {args.model}: transformers serve needs a model folder, not a .gguf")
    servers: dict[str, tuple[str, list[str]]] = {}  # name -> (engine, serve.sh flags)
    if "transformers" in args.engine:
        servers["plain"] = ("transformers", [])
        if not args.no_continuous_batching:
            servers["continuous_batching"] = ("transformers", ["--continuous_batching"])
    if "llama.cpp" in args.engine:
        servers[f"llama.cpp_{Path(args.model).stem if is_gguf else args.gguf_type}"] = ("llama.cpp", [])
    runs, speedup, load = [], {}, os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = args.model if is_gguf else None
        if "llama.cpp" in args.engine and gguf is None:
            from model.gguf import export_gguf

            written = export_gguf(args.model, out=str(Path(tmp) / "model.gguf"), types=[args.gguf_type])
            gguf = str(written[args.gguf_type])
        for name, (engine, flags) in servers.items():
            log = Path(tmp) / f"{name}.log"
            proc, url = start_server(gguf if engine == "llama.cpp" else args.model, flags, log)
            try:
                ask = request_fn(url, args.new_tokens, engine)
                ask(PROMPTS[0])  # warm-up: first-call allocations, the paged cache of continuous batching
                by_clients = {}
                for clients in args.clients:
                    by_clients[clients] = {"server": name, "engine": engine, **load_run(ask, clients, args.requests)}
                    print(json.dumps(by_clients[clients]), file=sys.stderr)
                runs += by_clients.values()
                low, high = min(args.clients), max(args.clients)
                speedup[name] = round(by_clients[high]["tokens_per_s"] / by_clients[low]["tokens_per_s"], 2)
            finally:
                stop_server(proc)
    print(json.dumps({"bench": "serve_load", "model": args.model, "new_tokens": args.new_tokens,
                      "cpu_threads": os.cpu_count(), "runs": runs,
                      f"speedup_{max(args.clients)}_vs_{min(args.clients)}_clients": speedup,
                      "load_average_at_start": [round(x, 2) for x in load]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
