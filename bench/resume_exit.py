"""Exit statuses of resumed runs: a save that failed, then a resume to the end, many times, under load.

Usage (from anywhere; ~25 s per run on 2 cores)::

    .venv/bin/python bench/resume_exit.py [--runs 50] [--ranks 2] [--hogs 2] [--hog_nice 0] [--work_dir DIR]

What runs: a tiny LLaMA and 40 Alpaca records made here; one launch of ``scripts/train_sft.sh
--num_gpus 2`` (``--ranks``: 2 CPU ranks, ZeRO-3, a checkpoint every 4 steps of 20) whose checkpoint 8 cannot
be written (a file stands where its folder goes): it stops with exit status 1 and ``latest`` names
checkpoint 4. Then ``--runs`` times: a fresh copy of that save path, resumed with ``--resume true``
to step 20. That is the pattern of the two tests in which ranks were seen aborting at exit
(``terminate called without an active exception``, launcher status 250 = a rank's SIGABRT).

``--hogs N`` starts N busy-looping processes beside the runs (a loaded CI machine): the abort is a
race at interpreter exit, which load makes far more likely (docs/results.md, "Exit status").
The last line is JSON: the count of each exit status, and of runs whose stderr has the abort line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ABORT_LINE = "terminate called without an active exception"
ARGS = ["--epochs", "2", "--batch_size", "4", "--micro_batch_size", "1", "--lr", "5e-3",
        "--warmup_steps", "1", "--dtype", "fp32", "--save_steps", "4", "--keep_last", "10"]
WORDS = "apple pear plum fig kiwi lime date mango grape melon red blue green black white one two three".split()


def records(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        out.append({"instruction": "Repeat the words.", "input": words, "output": words})
    return out


def launch(model: Path, data: Path, save: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    cmd = ["bash", "scripts/train_sft.sh", "--num_gpus", str(ranks), *ARGS, "--model_path", str(model),
           "--data_path", str(data), "--save_path", str(save), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def hog(niceness: int) -> None:
    os.nice(niceness)
    while True:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50, help="resumed launches (default 50)")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks of each launch (default 2; batch 4 allows 1, 2, 4)")
    p.add_argument("--hogs", type=int, default=2, help="busy-looping processes beside the runs (default 2)")
    p.add_argument("--hog_nice", type=int, default=0,
                   help="niceness of the hogs (default 0; negative puts them ahead of the runs, as root)")
    p.add_argument("--work_dir", default=None, help="where the model and save paths go (default: a temp folder)")
    args = p.parse_args()

    from demo.tiny import make_tiny_checkpoint

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="resume_exit_"))
    work.mkdir(parents=True, exist_ok=True)
    model, data, failed = work / "model", work / "data.json", work / "failed_save"
    data.write_text(json.dumps(records(40, seed=1)))
    if not model.is_dir():
        make_tiny_checkpoint(model, [" ".join(WORDS)] * 4 + [json.dumps(r) for r in records(50, seed=0)],
                             vocab_size=300, hidden_size=32, num_layers=2, num_heads=4)
    shutil.rmtree(failed, ignore_errors=True)
    failed.mkdir()
    (failed / "tmp-global_step8").write_text("in the way")
    first = launch(model, data, failed, args.ranks)
    if first.returncode != 1 or (failed / "latest").read_text() != "global_step4":
        sys.exit(f"the failed save did not fail as planned (status {first.returncode}): {first.stderr[-2000:]}")
    (failed / "tmp-global_step8").unlink()

    hogs = [multiprocessing.Process(target=hog, args=(args.hog_nice,), daemon=True) for _ in range(args.hogs)]
    for h in hogs:
        h.start()
    statuses: dict[int, int] = {}
    aborts, t0 = 0, time.time()
    try:
        for i in range(args.runs):
            save = work / "resumed"
            shutil.rmtree(save, ignore_errors=True)
            shutil.copytree(failed, save)
            proc = launch(model, data, save, args.ranks, "--resume", "true")
            statuses[proc.returncode] = statuses.get(proc.returncode, 0) + 1
            aborted = ABORT_LINE in proc.stderr
            aborts += aborted
            if proc.returncode == 0 and "starting at 4" not in proc.stdout:
                sys.exit(f"run {i} did not resume from checkpoint 4: {proc.stdout[-2000:]}")
            print(f"run {i + 1}/{args.runs}: exit status {proc.returncode}{' (abort at exit)' if aborted else ''}",
                  file=sys.stderr, flush=True)
    finally:
        for h in hogs:
            h.terminate()
    print(json.dumps({"runs": args.runs, "exit_statuses": {str(k): v for k, v in sorted(statuses.items())},
                      "runs_with_abort_line": aborts, "ranks": args.ranks, "hogs": args.hogs,
                      "hog_nice": args.hog_nice, "seconds": round(time.time() - t0, 1),
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
