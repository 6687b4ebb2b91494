"""Peak memory of the seed's export route against ``scripts/export_hf.sh``, on a real ZeRO-3 checkpoint.

Usage (from anywhere; the first run builds and caches the checkpoint, ~1.4 GB of fp32 weights)::

    .venv/bin/python bench/export_memory.py [--work_dir ckpt/bench_export] [--rebuild]

1. Checkpoint (cached under ``--work_dir``, built once): a random LLaMA (hidden 2048, 4 layers,
   vocab 32000: ~337 M parameters, ~1.35 GB fp32) trained one step by the trainer itself
   (``scripts/train_sft.sh --num_gpus 2``: 2 CPU ranks, ZeRO-3), so the optimizer files hold Adam
   moments as a training checkpoint does, next to the trainer's side files.
2. Seed route, in a copy of the save path (tag folder linked): the README's
   ``python SAVE/zero_to_fp32.py SAVE SAVE/pytorch_model.bin`` then ``scripts/make_shards.sh SAVE
   --keep_deepspeed`` (the linked checkpoint stays for the next route).
3. ``scripts/export_hf.sh SAVE OUT`` with its defaults (safetensors, training dtype fp32, 5GB shards).

Method: every command runs as a child process; a sampler reads ``RssAnon`` from
``/proc/PID/status`` of the child and all its descendants every ``--interval`` seconds and keeps
the largest sum. Anonymous memory is what the process allocated itself (tensors, heaps); file
pages mapped with mmap (the checkpoint read with ``torch.load(mmap=True)``) are page cache the
kernel can drop, so they are not what runs a machine out of memory and are not counted (their
peak, ``RssFile``, is printed for reference). Each command's result is its peak minus the peak
of a bare interpreter that imports the same libraries, measured the same way; the seed route's
peak is the larger of its two commands. The last line is JSON; ratios are peak / fp32 weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SHAPE = {"hidden_size": 2048, "num_layers": 4, "num_heads": 16, "intermediate_size": 5632}
VOCAB = 32000
IMPORTS = {
    "zero_to_fp32": "import torch, safetensors.torch, deepspeed.utils.zero_to_fp32",
    "make_shards": "import torch, huggingface_hub",
    "export_hf": "import torch, yaml, huggingface_hub, deepspeed.utils.zero_to_fp32",
}


@dataclass
class Peak:
    anon: int
    file: int
    wall: float


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, via each thread's ``children`` file."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


def rss_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of one process in kB; (0, 0) once it has gone."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return anon, file


def measure(cmd: list[str], cwd: Path, interval: float, env: dict[str, str] | None = None) -> Peak:
    """Run ``cmd``; the peak over time of the summed RssAnon (and RssFile) of its process tree."""
    peak = {"anon": 0, "file": 0}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        samples = [rss_kb(pid) for pid in tree_pids(proc.pid)]
        peak["anon"] = max(peak["anon"], sum(a for a, _ in samples))
        peak["file"] = max(peak["file"], sum(f for _, f in samples))
        time.sleep(interval)
    wall = time.perf_counter() - start
    reader.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(output)[-4000:]}")
    return Peak(anon=peak["anon"] * 1024, file=peak["file"] * 1024, wall=wall)


def bare(imports: str, interval: float) -> Peak:
    """A bare interpreter that imports ``imports`` and idles long enough to be sampled."""
    return measure([PYTHON, "-c", f"{imports}\nimport time\ntime.sleep(1.0)"], REPO, interval, child_env())


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return env


def build_checkpoint(work: Path) -> Path:
    """The cached 2-rank ZeRO-3 checkpoint (see the module docstring); built only if missing."""
    save = work / "save"
    if (save / "latest").is_file():
        return save
    sys.path.insert(0, str(REPO))
    from demo.tiny import llama_config, train_tokenizer, write_tiny_llama

    shutil.rmtree(work, ignore_errors=True)
    base, data = work / "base", work / "data.json"
    train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, base, vocab_size=320)
    write_tiny_llama(base, llama_config(VOCAB, **SHAPE))
    data.write_text(json.dumps([{"instruction": "Name an animal.", "input": "", "output": "the fox"}] * 2))
    started = time.perf_counter()
    cmd = ["bash", str(REPO / "scripts" / "train_sft.sh"), "--num_gpus", "2", "--model_path", str(base),
           "--data_path", str(data), "--save_path", str(save), "--epochs", "1", "--batch_size", "2",
           "--max_length", "64", "--dtype", "fp32"]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env={**child_env(), "PYTHON": PYTHON}, capture_output=True,
                          text=True)
    if proc.returncode != 0 or not (save / "latest").is_file():
        sys.exit(f"training the checkpoint failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"built 2-rank ZeRO-3 checkpoint in {save} ({time.perf_counter() - started:.0f} s)")
    return save


def seed_copy(save: Path, dst: Path) -> Path:
    """A save path for the seed route to write into: tag folders linked, small files copied."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for entry in save.iterdir():
        if entry.is_dir():
            (dst / entry.name).symlink_to(entry.resolve())
        else:
            shutil.copy2(entry, dst / entry.name)
    return dst


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work_dir",
        default=str(REPO / "ckpt" / "bench_export"),
        help="where the checkpoint is cached and the outputs are written (default ckpt/bench_export, git-ignored)",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoint")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between memory samples (default 0.02)")
    parser.add_argument("--keep", action="store_true", help="keep the exported folders (default: delete, ~2.7 GB)")
    return parser.parse_args(argv)


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir).resolve()
    if args.rebuild:
        shutil.rmtree(work, ignore_errors=True)
    save = build_checkpoint(work)
    print("method: " + __doc__.split("Method: ")[1].split("\n\n")[0].replace("\n", " ").replace("``", ""))
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    print(f"machine: {os.cpu_count()} CPUs, {ram / 2**30:.0f} GiB RAM")

    baselines = {name: bare(imports, args.interval) for name, imports in IMPORTS.items()}
    for name, peak in baselines.items():
        print(f"bare interpreter for {name}: RssAnon {mb(peak.anon)}")

    seed_dir = seed_copy(save, work / "seed_run")
    z2f = measure(
        [PYTHON, f"{seed_dir}/zero_to_fp32.py", str(seed_dir), f"{seed_dir}/pytorch_model.bin"],
        work,
        args.interval,
        child_env(),
    )
    shards = measure([str(REPO / "scripts" / "make_shards.sh"), str(seed_dir), "--keep_deepspeed"], work, args.interval,
                     child_env())
    export_out = work / "export_out"
    shutil.rmtree(export_out, ignore_errors=True)
    export = measure(
        [str(REPO / "scripts" / "export_hf.sh"), str(save), str(export_out)], work, args.interval, child_env()
    )

    index = json.loads((export_out / "model.safetensors.index.json").read_text())
    config = json.loads((export_out / "config.json").read_text())
    if config["dtype"] != "float32":
        sys.exit(f"expected an fp32 export, got {config['dtype']}")
    model_bytes = int(index["metadata"]["total_size"])

    above = {
        "zero_to_fp32": max(0, z2f.anon - baselines["zero_to_fp32"].anon),
        "make_shards": max(0, shards.anon - baselines["make_shards"].anon),
        "export_hf": max(0, export.anon - baselines["export_hf"].anon),
    }
    print(f"model: {model_bytes:,} bytes of fp32 weights ({mb(model_bytes)})")
    for name, peak in (("zero_to_fp32", z2f), ("make_shards", shards), ("export_hf", export)):
        print(
            f"{name:>12}: peak RssAnon above bare {mb(above[name])} ({above[name] / model_bytes:.2f}x model), "
            f"peak RssFile {mb(peak.file)}, wall {peak.wall:.1f} s"
        )
    seed_peak = max(above["zero_to_fp32"], above["make_shards"])
    print(f"seed route wall: {z2f.wall + shards.wall:.1f} s; export_hf.sh wall: {export.wall:.1f} s")
    if not args.keep:
        shutil.rmtree(export_out, ignore_errors=True)
        shutil.rmtree(seed_dir, ignore_errors=True)
    result = {
        "model_fp32_bytes": model_bytes,
        "seed_peak_bytes": seed_peak,
        "export_peak_bytes": above["export_hf"],
        "seed_ratio": round(seed_peak / model_bytes, 3),
        "export_ratio": round(above["export_hf"] / model_bytes, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
