"""Training metrics: TensorBoard events, a JSONL log that survives resumes, and ``loss.png``.

Only rank 0 writes. ``metrics.jsonl`` holds one line per logged step; after a resume the re-run
steps are appended again and the plot keeps the last line of each step.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, log_dir: str | Path, enabled: bool):
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step: int, split: str, **values: float) -> None:
        """Record ``values`` under ``split/name`` (e.g. train/loss) at ``step``."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        with open(self.log_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_losses(log_dir: str | Path) -> dict[str, dict[int, float]]:
    """``{"train": {step: loss}, "eval": {step: loss}}``; a re-run step keeps its last value."""
    curves: dict[str, dict[int, float]] = {"train": {}, "eval": {}}
    path = Path(log_dir) / METRICS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                curves.setdefault(row["split"], {})[row["step"]] = row["loss"]
    return curves


def plot_losses(log_dir: str | Path, out: str | Path) -> Path:
    """Train and eval loss against optimizer steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_losses(log_dir)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for split, style in (("train", "-"), ("eval", "o-")):
        if curves.get(split):
            steps = sorted(curves[split])
            ax.plot(steps, [curves[split][s] for s in steps], style, label=f"{split} loss", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per supervised token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
