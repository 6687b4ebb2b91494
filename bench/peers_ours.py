"""train_sft.py with each rank's peak memory written at exit, for bench/peers.py.

    PEERS_MEMORY_DIR=DIR TRAIN_ENTRY=bench/peers_ours.py scripts/train_sft.sh <train_sft.py flags>

The trainer itself reports no memory figure; this wrapper adds one from outside, so that every
trainer bench/peers.py compares is measured the same way (bench/peers_trl.py records the same file).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_memory_mib() -> float:
    """This process's peak: allocated accelerator memory on a GPU, resident set size on CPU."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def record_peak_memory() -> None:
    """At exit, write ``{"rank": r, "peak_mib": m}`` to ``$PEERS_MEMORY_DIR/rank{r}.json``."""
    folder = os.environ.get("PEERS_MEMORY_DIR")
    if not folder:
        return

    def write() -> None:
        rank = int(os.environ.get("RANK", "0"))
        Path(folder, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_mib": peak_memory_mib()}))

    atexit.register(write)


if __name__ == "__main__":
    import train_sft

    record_peak_memory()
    sys.exit(train_sft.main())
