"""Supervised fine-tuning of OpenLLaMA on Alpaca-format data or conversations with DeepSpeed ZeRO-3.

Launched by ``scripts/train_sft.sh`` (the DeepSpeed launcher, any number of GPUs or CPU ranks);
``python train_sft.py ...`` alone runs one process. Every problem with the config, the data or
the model folder is reported before any model is built.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from model.attention import attention_implementation
from model.llama import ModelPathError, check_model_folder, load_model, load_tokenizer, save_model_metadata
from openalpaca.batching import Batching, token_counts
from openalpaca.config import ConfigError, TrainConfig, load_config, load_ds_config, resolve_ds_config
from openalpaca.data import SFTDataset, micro_batches, read_training_data, split_records, total_steps
from openalpaca.distributed import init_distributed
from openalpaca.loss import num_targets, sft_ce_sum
from openalpaca.metrics import MetricsLogger, plot_losses
from openalpaca.packing import model_inputs
from openalpaca.records import DataError, check_save_path

REPO = Path(__file__).resolve().parent
# Keys that decide which samples each step sees: a resumed run must agree on them.
DATA_ORDER_KEYS = ("seed", "batch_size", "micro_batch_size", "max_length", "epochs", "epoch_tail", "layout",
                   "truncation")
CONFIG_NAME = "train_config.yaml"  # the resolved config, written next to every checkpoint
DS_CONFIG_NAME = "ds_config.json"  # the DeepSpeed JSON as the engine got it ("auto" filled, overrides applied)
STATE_NAME = "trainer_state_rank{rank}.pt"  # per-rank RNG state inside a checkpoint tag
ADAPTER_DIR = "adapter"  # the LoRA adapter, peft format, next to the checkpoint
TRAINER_STATE = "trainer_state.json"  # step, data position and config of a checkpoint, readable without DeepSpeed
SUMMARY_NAME = "summary.json"  # in logs/: the run's figures, machine-readable
TMP_PREFIX = "tmp-"  # a tag is written under this prefix and renamed once every rank is done
UNIVERSAL = "universal"  # inside a tag: its DeepSpeed universal checkpoint, for a resume on another world size

# gloo's collectives through torch.distributed warn on every call under DeepSpeed.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says at which step and why."""


def single_process_env() -> None:
    """``python train_sft.py`` without a launcher: describe a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


@dataclass
class Prepared:
    train_set: SFTDataset
    eval_set: SFTDataset | None
    tokenizer: object
    ds_config: dict
    total_steps: int
    resume_point: ResumePoint | None


def prepare(cfg: TrainConfig, world_size: int) -> Prepared:
    """Everything that can fail on user input, checked before DeepSpeed or a model is touched."""
    raw_ds = load_ds_config(cfg.ds_config)
    check_model_folder(cfg.model_path)
    check_save_path(cfg.save_path)
    records = read_training_data(cfg.data_path, cfg.data_format, cfg.system_message)
    eval_records = (read_training_data(cfg.eval_data_path, cfg.data_format, cfg.system_message)
                    if cfg.eval_data_path else [])
    if not cfg.eval_data_path and cfg.eval_ratio > 0:
        records, eval_records = split_records(records, cfg.eval_ratio, cfg.seed)
    tokenizer = load_tokenizer(cfg.model_path)
    fmt = cfg.sample_format()
    dataset = SFTDataset.from_records(records, tokenizer, cfg.max_length, fmt)
    if len(dataset) == 0:
        raise DataError(f"{cfg.data_path}: none of {len(records)} records fits in max_length {cfg.max_length}")
    eval_set = SFTDataset.from_records(eval_records, tokenizer, cfg.max_length, fmt) if eval_records else None
    steps = total_steps(len(dataset), cfg.epochs, cfg.batch_size, cfg.epoch_tail)
    if steps == 0:
        raise DataError(f"{cfg.data_path}: {len(dataset)} samples x {cfg.epochs} epochs make no full batch of "
                        f"{cfg.batch_size} (epoch_tail: carry)")
    ds_config = resolve_ds_config(raw_ds, cfg, world_size, steps, path=cfg.ds_config)
    resume_point = checkpoint_to_resume(cfg, len(dataset))
    if resume_point and resume_point.world_size != world_size:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return Prepared(dataset, eval_set, tokenizer, ds_config, steps, resume_point)


def make_batching(cfg: TrainConfig, world_size: int, rank: int) -> Batching:
    return Batching(batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                    max_tokens=(cfg.max_tokens_per_micro_batch or cfg.max_length) if cfg.pack else 0,
                    seed=cfg.seed, epoch_tail=cfg.epoch_tail, weighting=cfg.loss_weighting,
                    world_size=world_size, rank=rank)


def build_engine(cfg: TrainConfig, ds_config: dict):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # While this object lives, from_pretrained loads weights straight into ZeRO-3 partitions.
    ds_hf = HfDeepSpeedConfig(ds_config)
    model = load_model(cfg.model_path, cfg.dtype,
                       attn_implementation=attention_implementation(cfg.pack, hidden_keys=cfg.hide_eos_keys))
    del ds_hf
    model.config.use_cache = False
    if cfg.lora_r:
        model = add_lora(model, cfg)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant, the transformers 5.x default
    if cfg.zero3_leaf_modules:
        set_leaf_modules(model, [n.strip() for n in cfg.zero3_leaf_modules.split(",") if n.strip()])
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    return engine


def set_leaf_modules(model, names: list[str]) -> None:
    """Let ZeRO-3 gather each module of these classes (and everything inside it) in one go.

    DeepSpeed runs Python hooks before and after every submodule; for a small model on CPU they
    are a large share of each step (docs/results.md, ZeRO-3 on CPU). Numerics do not change.
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m).__name__: type(m) for m in model.modules()}
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise TrainingError(f"zero3_leaf_modules: the model has no module class {', '.join(unknown)} "
                            f"(it has {', '.join(sorted(classes))})")
    set_z3_leaf_modules(model, [classes[n] for n in names])


def add_lora(model, cfg: TrainConfig):
    """Freeze the base model and train LoRA adapters on ``cfg.lora_target_modules``."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules.split(","), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def save_adapter(engine, save: Path) -> None:
    """Write the LoRA adapter (peft format) to ``save/adapter``; ZeRO-3 partitions are gathered first."""
    import deepspeed

    trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(trainable.values()), modifier_rank=None):
        if dist.get_rank() == 0:
            state = {n: p.detach().cpu().clone() for n, p in trainable.items()}
            engine.module.save_pretrained(save / ADAPTER_DIR, state_dict=state)
    dist.barrier()


def all_reduce_sum(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum over ranks, in float64 on the CPU (a scalar or a small vector)."""
    t = torch.as_tensor(value, dtype=torch.float64).to(device)
    dist.all_reduce(t)
    return t.cpu()


def save_checkpoint(engine, cfg: TrainConfig, step: int, epoch: int, num_samples: int) -> str:
    """Write tag ``global_step{step}`` so that it becomes ``latest`` only once every rank finished it.

    The temporary tag folder is made and probed by every rank first: when any rank cannot write
    it, every rank stops here with a TrainingError, and ``latest`` still names the last good
    checkpoint.
    """
    rank, save = dist.get_rank(), Path(cfg.save_path)
    tag = f"global_step{step}"
    tmp = TMP_PREFIX + tag
    problem = unwritable(save / tmp)
    if any_rank(bool(problem), engine.device):
        latest = (save / "latest").read_text().strip() if (save / "latest").is_file() else "no checkpoint"
        raise TrainingError(f"checkpoint {tag} could not be written to {save} "
                            f"({problem or 'on another rank'}); latest still names {latest}")
    state = {"global_step": step, "epoch": epoch, "num_samples": num_samples, "world_size": dist.get_world_size(),
             "config": cfg.to_dict()}
    engine.save_checkpoint(str(save), tag=tmp, client_state=state, save_latest=False)
    if rank == 0:
        (save / tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    torch.save(rng, save / tmp / STATE_NAME.format(rank=rank))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(save / tag, ignore_errors=True)
        os.replace(save / tmp, save / tag)
        (save / "latest.tmp").write_text(tag)
        os.replace(save / "latest.tmp", save / "latest")
        # DeepSpeed drops its own converter here; ours also accepts the seed's `... pytorch_model.bin` form.
        shutil.copy2(REPO / "scripts" / "zero_to_fp32.py", save / "zero_to_fp32.py")
        prune_checkpoints(save, cfg.keep_last, keep=tag)
    dist.barrier()
    return tag


def unwritable(folder: Path) -> str:
    """Why this rank cannot write into ``folder`` (rank 0 makes it first); "" when it can."""
    if dist.get_rank() == 0:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            problem = f"{err.strerror or err}: {folder}"
        else:
            problem = ""
    dist.barrier()
    if dist.get_rank() == 0 and problem:
        return problem
    probe = folder / f".probe-rank{dist.get_rank()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"{err.strerror or err}: {probe}"
    return ""


def any_rank(flag: bool | int, device) -> int:
    """The largest of every rank's ``flag``: what one rank saw, all ranks act on."""
    t = torch.tensor([int(flag)], dtype=torch.int64).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class StopSignal:
    """SIGTERM and SIGINT, what schedulers send before they kill a job, ask the run to stop.

    The handler only notes the signal; after each optimizer step every rank asks the others
    (``any_rank``), so all ranks stop after the same step, save it, and exit 0. A second signal
    changes nothing.
    """

    def __init__(self) -> None:
        self.signum = 0

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame) -> None:
        self.signum = self.signum or signum

    def agreed(self, device) -> str:
        """The name of the signal any rank received ("" when none)."""
        signum = any_rank(self.signum, device)
        return signal.Signals(signum).name if signum else ""


STOP = StopSignal()


def stopped_or_saved(engine, cfg: TrainConfig, step: int, epoch: int, num_samples: int) -> bool:
    """After an optimizer step: save when ``save_steps`` says so, or when a stop signal came (then
    say where the checkpoint is and return True: the run ends there)."""
    due = cfg.save_steps and step % cfg.save_steps == 0
    tag = save_checkpoint(engine, cfg, step, epoch, num_samples) if due else ""
    stop = STOP.agreed(engine.device)
    if stop:
        tag = tag or save_checkpoint(engine, cfg, step, epoch, num_samples)
        if dist.get_rank() == 0:
            print(f"stopped by {stop} after step {step}: checkpoint {Path(cfg.save_path) / tag}; "
                  f"to continue, run the same command with --resume true", flush=True)
    return bool(stop)


def prune_checkpoints(save: Path, keep_last: int, keep: str) -> None:
    tags = sorted(
        (p for p in save.glob("global_step*") if p.is_dir()), key=lambda p: int(p.name.removeprefix("global_step"))
    )
    for path in tags[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path)
    for path in save.glob(TMP_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class ResumePoint:
    tag: str  # the checkpoint to continue from
    world_size: int  # the world size that wrote it


def checkpoint_to_resume(cfg: TrainConfig, num_samples: int) -> ResumePoint | None:
    """The ``latest`` checkpoint of save_path, checked to continue this very run; None when there is none.

    The world size may change (ZeRO-3's partitions are re-cut through DeepSpeed's universal
    checkpoint format, see ``resume``); what decides the samples of each step may not.
    """
    latest = Path(cfg.save_path) / "latest"
    if not cfg.resume or not latest.is_file():
        return None
    tag = latest.read_text().strip()
    state = json.loads((Path(cfg.save_path) / tag / TRAINER_STATE).read_text())
    saved = state["config"]
    changed = [f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}"
               for k in DATA_ORDER_KEYS if saved.get(k) != getattr(cfg, k)]
    if state["num_samples"] != num_samples:
        changed.append(f"num_samples {state['num_samples']} -> {num_samples}")
    if changed:
        raise ConfigError(f"cannot resume {cfg.save_path}/{tag}: the data order changed ({', '.join(changed)})")
    return ResumePoint(tag, state["world_size"])


def to_universal(tag_dir: Path) -> None:
    """Convert checkpoint ``tag_dir`` to DeepSpeed's universal format in ``tag_dir/universal``, once
    (rank 0 converts into a temporary folder and renames it; the others wait)."""
    target = tag_dir / UNIVERSAL
    if dist.get_rank() == 0 and not target.is_dir():
        tmp = tag_dir / (TMP_PREFIX + UNIVERSAL)
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise TrainingError(f"converting {tag_dir} to DeepSpeed's universal format failed: "
                                f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
        os.replace(tmp, target)
    dist.barrier()


def resume(engine, cfg: TrainConfig, point: ResumePoint) -> int:
    """Load checkpoint ``point``; returns the number of optimizer steps already done.

    On another world size than the one that wrote it, the checkpoint is read through DeepSpeed's
    universal format (each parameter and its Adam moments whole, re-partitioned on load; the
    engine was built with ``checkpoint.load_universal``). RNG states come from this rank's file,
    or rank 0's when the checkpoint has none for it.
    """
    tag_dir = Path(cfg.save_path) / point.tag
    if point.world_size != dist.get_world_size():
        if dist.get_rank() == 0:
            print(f"resuming {tag_dir} (written by {point.world_size} ranks) on {dist.get_world_size()} ranks "
                  f"through DeepSpeed's universal checkpoint format")
        to_universal(tag_dir)
        _, client_state = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL)
    else:
        _, client_state = engine.load_checkpoint(cfg.save_path, tag=point.tag)
    own = tag_dir / STATE_NAME.format(rank=dist.get_rank())
    rng = torch.load(own if own.is_file() else tag_dir / STATE_NAME.format(rank=0), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return client_state["global_step"]


def step_weight(batch: dict) -> float:
    """What one micro-batch adds to its step's loss denominator: its targets (token weighting)
    or its samples (sample weighting: each sample's target weights sum to 1)."""
    return float(batch["weights"].sum()) if "weights" in batch else num_targets(batch["labels"])


def batch_ce_sum(engine, batch: dict) -> torch.Tensor:
    """The micro-batch's cross-entropy sum, weighted by its ``weights`` when it has them."""
    weights = batch["weights"].to(engine.device) if "weights" in batch else None
    return sft_ce_sum(engine, model_inputs(batch, engine.device), batch["labels"].to(engine.device), weights)


def train_step(engine, batches: list[dict], world: int) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches; returns (step loss, supervised tokens).

    The step loss is ``sum(w * ce) / sum(w)`` over every target of the step, whichever rank and
    micro-batch it landed in: ``w = 1`` (token weighting) or ``1 / n_i`` for the ``n_i`` targets
    of sample ``i`` (sample weighting: the mean of the samples' mean losses, the original's).
    """
    gas = engine.gradient_accumulation_steps()
    local = torch.tensor([sum(step_weight(b) for b in batches), sum(num_targets(b["labels"]) for b in batches)])
    total, n_tokens = all_reduce_sum(local, engine.device).tolist()
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(batches):
        # A packed step has as many micro-batches as its samples need: say which one ends it.
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        ce = batch_ce_sum(engine, batch)
        # DeepSpeed divides by gas and averages over ranks; undo both so the gradient is sum / total.
        engine.backward(ce * (gas * world / total))
        engine.step()
        loss_sum += ce.detach().double().cpu()
    return all_reduce_sum(loss_sum, engine.device).item() / total, n_tokens


@torch.no_grad()
def eval_loss(engine, eval_set: SFTDataset, batching: Batching) -> float:
    """Loss over the whole eval set, weighted as in training; every rank runs the same number of
    forwards (ZeRO-3 gathers)."""
    engine.eval()
    ce, total = 0.0, 0.0
    for batch in micro_batches(eval_set, batching.everything(eval_set), batching.weighting):
        ce += batch_ce_sum(engine, batch).item()
        total += step_weight(batch)
    engine.train()
    ce, total = all_reduce_sum(torch.tensor([ce, total]), engine.device).tolist()
    return ce / total


def train(cfg: TrainConfig, data: Prepared) -> None:
    """Build the engine, run the loop, save; the engine and the metrics writer are closed on every way out."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    engine = build_engine(cfg, data.ds_config)
    save = Path(cfg.save_path)
    (save / "logs").mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(save / "logs", enabled=dist.get_rank() == 0)
    try:
        run_loop(engine, metrics, cfg, data)
    finally:
        metrics.close()  # TensorBoard's writer thread flushes and ends
        engine.destroy()  # ZeRO-3's hooks and buffers


def run_loop(engine, metrics: MetricsLogger, cfg: TrainConfig, data: Prepared) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset, save, total_steps = data.train_set, Path(cfg.save_path), data.total_steps
    batching = make_batching(cfg, world, rank)
    step = resume(engine, cfg, data.resume_point) if data.resume_point else 0
    if rank == 0:
        write_run_files(engine, cfg, data, save)
        print(f"{len(dataset)} samples ({dataset.num_skipped} skipped: prompt longer than max_length, "
              f"{dataset.num_truncated} truncated), {len(data.eval_set or [])} eval samples; "
              f"{batching.describe(engine.gradient_accumulation_steps())}; {total_steps} steps, starting at {step}")
    run, stopped = RunStats(), False
    # Redrawn often on a terminal; in a log file every redraw is a line, so rarely. Closed on any exit,
    # so an error line starts a line of its own.
    with tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 60) as bar:
        while step < total_steps and not stopped:
            epoch = batching.epoch(step, len(dataset))
            batches = batching.micro_batches(dataset, step)
            run.add_micro_batches(batches)
            run.loss, n_tokens = train_step(engine, batches, world)
            step += 1
            run.supervised += n_tokens
            if not math.isfinite(run.loss):
                raise TrainingError(f"non-finite loss {run.loss} at step {step}; stopping, the last good checkpoint "
                                    f"is kept")
            lr, tok_s = engine.get_lr()[0], run.supervised / run.elapsed()
            metrics.log(step, "train", loss=run.loss, lr=lr, grad_norm=float(engine.get_global_grad_norm() or 0.0),
                        tokens_per_s=tok_s, supervised_tokens=n_tokens)
            if step % cfg.logging_steps == 0 or step == total_steps:
                bar.set_postfix(loss=f"{run.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}", refresh=False)
                if rank == 0:
                    log_line(f"step {step}/{total_steps} epoch {epoch} loss {run.loss:.4f} lr {lr:.3e}")
            if data.eval_set and (step == total_steps or cfg.eval_steps and step % cfg.eval_steps == 0):
                run.eval_loss = eval_loss(engine, data.eval_set, batching)
                metrics.log(step, "eval", loss=run.eval_loss)
                if rank == 0:
                    log_line(f"step {step}/{total_steps} eval loss {run.eval_loss:.4f}")
            bar.update(1)
            stopped = step < total_steps and stopped_or_saved(engine, cfg, step, epoch, len(dataset))
    run.train_seconds = run.elapsed()
    if stopped:
        return
    tag = save_checkpoint(engine, cfg, step, cfg.epochs, len(dataset))
    if cfg.lora_r:
        save_adapter(engine, save)
    finish(run, engine, cfg, save, tag, step)


def log_line(line: str) -> None:
    """A line of the run's log: above the progress bar on a terminal; plainly where stderr is a file,
    since ``tqdm.write`` draws the bar once more after every line it writes."""
    if sys.stderr.isatty():
        tqdm.write(line)
    else:
        print(line, flush=True)


@dataclass
class RunStats:
    """What a run reports at its end (and in ``logs/summary.json``); token counts are this rank's
    until ``finish`` sums them."""

    loss: float = float("nan")
    eval_loss: float = float("nan")
    supervised: float = 0.0  # supervised tokens over all ranks (train_step sums them)
    micro_steps: int = 0
    tokens_in: float = 0.0
    padding: float = 0.0
    train_seconds: float = 0.0
    t0: float = field(default_factory=time.time)

    def add_micro_batches(self, batches: list[dict]) -> None:
        n_in, n_pad = token_counts(batches)
        self.micro_steps, self.tokens_in, self.padding = self.micro_steps + len(batches), self.tokens_in + n_in, \
            self.padding + n_pad

    def elapsed(self) -> float:
        return time.time() - self.t0


def write_run_files(engine, cfg: TrainConfig, data: Prepared, save: Path) -> None:
    """Model config, tokenizer, the resolved training config and DeepSpeed JSON, next to the checkpoints."""
    save_model_metadata(engine.module, data.tokenizer, save, cfg.layout)
    (save / CONFIG_NAME).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (save / DS_CONFIG_NAME).write_text(json.dumps(data.ds_config, indent=2) + "\n")


def finish(run: RunStats, engine, cfg: TrainConfig, save: Path, tag: str, step: int) -> None:
    """The closing lines and ``logs/summary.json`` (what benchmarks read)."""
    run.tokens_in, run.padding = all_reduce_sum(torch.tensor([run.tokens_in, run.padding]), engine.device).tolist()
    if dist.get_rank() != 0:
        return
    summary = {"steps": step, "batch_size": cfg.batch_size, "world_size": dist.get_world_size(),
               "micro_steps_per_rank": run.micro_steps, "tokens_processed": run.tokens_in,
               "padding_tokens": run.padding, "supervised_tokens": run.supervised,
               "train_seconds": run.train_seconds, "final_loss": run.loss,
               "eval_loss": run.eval_loss if math.isfinite(run.eval_loss) else None, "checkpoint": str(save / tag)}
    (save / "logs" / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"throughput: {run.micro_steps} micro-steps per rank, {run.tokens_in:.0f} tokens processed "
          f"({run.padding:.0f} padding), {run.supervised:.0f} supervised, {run.train_seconds:.2f}s training")
    plot = plot_losses(save / "logs", save / "loss.png")
    eval_text = f", eval loss {run.eval_loss:.4f}" if math.isfinite(run.eval_loss) else ""
    print(f"done: {step} steps, {step * cfg.batch_size} sample slots, {run.supervised:.0f} supervised tokens this "
          f"run in {run.elapsed():.0f}s; final train loss {run.loss:.4f}{eval_text}; "
          f"checkpoint {save / tag}, plot {plot}, TensorBoard {save / 'logs'}")
    print(f"convert with: python {save}/zero_to_fp32.py {save} {save}/pytorch_model.bin")


def main(argv: list[str] | None = None) -> int:
    STOP.install()
    try:
        cfg = load_config(argv)
        single_process_env()
        data = prepare(cfg, int(os.environ["WORLD_SIZE"]))
    except (ConfigError, DataError, ModelPathError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 1
    init_distributed()
    status = 0
    try:
        train(cfg, data)
    except TrainingError as err:  # raised on every rank alike: one line is enough
        if os.environ["RANK"] == "0":
            print(f"error: {err}", file=sys.stderr)
        status = 1
    leave_process_group()
    return status


def leave_process_group() -> None:
    """Destroy the process group while the interpreter is whole: success, error line and SIGTERM alike.

    Without it gloo's worker threads outlive ``main``: a worker that drops the last reference to a
    finished collective's tensors then needs the GIL, and during interpreter finalization that
    ends the thread inside C++ code, which aborts the process ("terminate called without an
    active exception", the launcher's exit status 250). It is a race at exit that load makes
    likely (docs/results.md, "Exit status"). Every rank gets here at the same point (errors are
    agreed on first), so no collective is in flight. After an unexpected exception the group is
    left alone: a rank that stopped mid-collective could make the others wait for it here.
    """
    import deepspeed.comm

    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's own references to the groups


if __name__ == "__main__":
    sys.exit(main())
