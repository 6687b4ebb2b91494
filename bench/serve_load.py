"""Concurrent clients against ``scripts/serve.sh``: requests/s, tokens/s and latency for 1 and 8 clients.

Usage (from anywhere; ~2-4 minutes on 2 cores with the demo's model)::

    .venv/bin/python bench/serve_load.py [--model ckpt/demo/openalpaca] [--clients 1 8] [--requests 16]
                                         [--new_tokens 32] [--no_continuous_batching]

What runs: ``scripts/serve.sh MODEL`` (transformers serve behind the request guard, on CPU), once
as it comes and once with ``--continuous_batching``. Against each, the same ``--requests`` chat
requests are sent by 1 client, then by 8 at once (each client sends its share one after the
other, with the ``openai`` client), after one warm-up request. Every request is greedy and makes
``--new_tokens`` tokens: its ``generation_config`` (transformers serve's own request field) names
``<unk>``, an id training never targets, as the eos, because continuous batching ignores
``min_new_tokens``; so every run does the same work whatever the model answers (the tokens counted
are the server's ``usage``). The prompts are the demo's kinds of instructions, with and without an input.

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


def start_server(model: str, continuous_batching: bool, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = ["bash", str(REPO / "scripts" / "serve.sh"), model, "--port", str(port)]
    cmd += ["--continuous_batching"] if continuous_batching else []
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


def request_fn(url: str, new_tokens: int):
    """One greedy chat request of exactly ``new_tokens`` tokens; returns (latency_s, completion_tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    # eos is <unk> (0), which training never targets: continuous batching ignores min_new_tokens
    fixed = json.dumps({"do_sample": False, "max_new_tokens": new_tokens, "bos_token_id": 1, "eos_token_id": 0,
                        "pad_token_id": 0})

    def ask(prompt: str) -> tuple[float, int]:
        start = time.perf_counter()
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=new_tokens, extra_body={"generation_config": fixed})
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.model).is_dir():
        sys.exit(f"error: {args.model}: model folder not found (bash scripts/demo.sh writes ckpt/demo/openalpaca)")
    servers = {"plain": False} if args.no_continuous_batching else {"plain": False, "continuous_batching": True}
    runs, speedup = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, continuous in servers.items():
            log = Path(tmp) / f"{name}.log"
            proc, url = start_server(args.model, continuous, log)
            try:
                ask = request_fn(url, args.new_tokens)
                ask(PROMPTS[0])  # warm-up: first-call allocations, the paged cache of continuous batching
                by_clients = {}
                for clients in args.clients:
                    by_clients[clients] = {"server": name, **load_run(ask, clients, args.requests)}
                    print(json.dumps(by_clients[clients]), file=sys.stderr)
                runs += by_clients.values()
                low, high = min(args.clients), max(args.clients)
                speedup[name] = round(by_clients[high]["tokens_per_s"] / by_clients[low]["tokens_per_s"], 2)
            finally:
                stop_server(proc)
    print(json.dumps({"bench": "serve_load", "model": args.model, "new_tokens": args.new_tokens,
                      "cpu_threads": os.cpu_count(), "runs": runs,
                      f"speedup_{max(args.clients)}_vs_{min(args.clients)}_clients": speedup}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
