"""Supervised fine-tuning of OpenLLaMA on Alpaca-format data with DeepSpeed ZeRO-3.

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
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from model.llama import ModelPathError, check_model_folder, load_model, load_tokenizer, save_model_metadata
from openalpaca.config import (
    ConfigError,
    TrainConfig,
    load_config,
    load_ds_config,
    resolve_ds_config,
    steps_per_epoch,
)
from openalpaca.data import SFTDataset, micro_batches, plan_epoch, read_alpaca, split_records
from openalpaca.distributed import init_distributed
from openalpaca.loss import sft_ce_sum
from openalpaca.metrics import MetricsLogger, plot_losses
from openalpaca.packing import (
    attention_implementation,
    model_inputs,
    packed_micro_batches,
    plan_packed_epoch,
    token_budget,
    token_counts,
)
from openalpaca.prompts import IGNORE_INDEX
from openalpaca.records import DataError

REPO = Path(__file__).resolve().parent
# Keys that decide which samples each step sees: a resumed run must agree on them.
DATA_ORDER_KEYS = ("seed", "batch_size", "micro_batch_size", "max_length", "epochs")
# Test hook: "save:N" kills the whole launch (SIGKILL) halfway through writing checkpoint N.
CRASH_ENV = "OPENALPACA_CRASH_AT"
CONFIG_NAME = "train_config.yaml"  # the resolved config, written next to every checkpoint
DS_CONFIG_NAME = "ds_config.json"  # the DeepSpeed JSON as the engine got it ("auto" filled, overrides applied)
STATE_NAME = "trainer_state_rank{rank}.pt"  # per-rank RNG state inside a checkpoint tag
ADAPTER_DIR = "adapter"  # the LoRA adapter, peft format, next to the checkpoint
TRAINER_STATE = "trainer_state.json"  # step, data position and config of a checkpoint, readable without DeepSpeed
TMP_PREFIX = "tmp-"  # a tag is written under this prefix and renamed once every rank is done

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
    resume_tag: str | None


def prepare(cfg: TrainConfig, world_size: int) -> Prepared:
    """Everything that can fail on user input, checked before DeepSpeed or a model is touched."""
    raw_ds = load_ds_config(cfg.ds_config)
    check_model_folder(cfg.model_path)
    records = read_alpaca(cfg.data_path)
    eval_records = read_alpaca(cfg.eval_data_path) if cfg.eval_data_path else []
    if not cfg.eval_data_path and cfg.eval_ratio > 0:
        records, eval_records = split_records(records, cfg.eval_ratio, cfg.seed)
    tokenizer = load_tokenizer(cfg.model_path)
    dataset = SFTDataset.from_records(records, tokenizer, cfg.max_length)
    if len(dataset) == 0:
        raise DataError(f"{cfg.data_path}: none of {len(records)} records fits in max_length {cfg.max_length}")
    eval_set = SFTDataset.from_records(eval_records, tokenizer, cfg.max_length) if eval_records else None
    total_steps = cfg.epochs * steps_per_epoch(len(dataset), cfg.batch_size)
    ds_config = resolve_ds_config(raw_ds, cfg, world_size, total_steps, path=cfg.ds_config)
    resume_tag = checkpoint_to_resume(cfg, len(dataset), world_size)
    return Prepared(dataset, eval_set, tokenizer, ds_config, total_steps, resume_tag)


def build_engine(cfg: TrainConfig, ds_config: dict):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # While this object lives, from_pretrained loads weights straight into ZeRO-3 partitions.
    ds_hf = HfDeepSpeedConfig(ds_config)
    model = load_model(cfg.model_path, cfg.dtype, attn_implementation=attention_implementation(cfg.pack))
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
    are a large share of each step (config/demo.yaml: 3.92 -> 4.47 steps/s). Numerics do not change.
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


def all_reduce_sum(value: float | torch.Tensor, device: torch.device) -> float:
    t = torch.as_tensor(value, dtype=torch.float64, device=device).clone()
    dist.all_reduce(t)
    return t.item()


def save_checkpoint(engine, cfg: TrainConfig, step: int, epoch: int, num_samples: int) -> str:
    """Write tag ``global_step{step}`` so that it becomes ``latest`` only once every rank finished it."""
    rank, save = dist.get_rank(), Path(cfg.save_path)
    tag = f"global_step{step}"
    tmp = TMP_PREFIX + tag
    state = {"global_step": step, "epoch": epoch, "num_samples": num_samples, "world_size": dist.get_world_size(),
             "config": cfg.to_dict()}
    engine.save_checkpoint(str(save), tag=tmp, client_state=state, save_latest=False)
    if rank == 0:
        (save / tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
    if os.environ.get(CRASH_ENV) == f"save:{step}":
        os.killpg(os.getpgid(0), signal.SIGKILL)
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


def prune_checkpoints(save: Path, keep_last: int, keep: str) -> None:
    tags = sorted(
        (p for p in save.glob("global_step*") if p.is_dir()), key=lambda p: int(p.name.removeprefix("global_step"))
    )
    for path in tags[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path)
    for path in save.glob(TMP_PREFIX + "*"):
        shutil.rmtree(path, ignore_errors=True)


def log_sample_ids(save_path: str, rank: int, step: int, ids: list[int]) -> None:
    """Append which records this rank trained on at ``step``: proof that resuming loses none."""
    with open(Path(save_path) / "logs" / f"samples_rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "ids": ids}) + "\n")


def checkpoint_to_resume(cfg: TrainConfig, num_samples: int, world_size: int) -> str | None:
    """The ``latest`` tag of save_path, checked to continue this very run; None when there is none."""
    latest = Path(cfg.save_path) / "latest"
    if not cfg.resume or not latest.is_file():
        return None
    tag = latest.read_text().strip()
    state = json.loads((Path(cfg.save_path) / tag / TRAINER_STATE).read_text())
    saved = state["config"]
    changed = [f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in DATA_ORDER_KEYS if saved[k] != getattr(cfg, k)]
    for key, now in (("num_samples", num_samples), ("world_size", world_size)):
        if state[key] != now:
            changed.append(f"{key} {state[key]} -> {now}")
    if changed:
        raise ConfigError(f"cannot resume {cfg.save_path}/{tag}: the data order changed ({', '.join(changed)})")
    return tag


def resume(engine, cfg: TrainConfig, tag: str) -> int:
    """Load checkpoint ``tag``; returns the number of optimizer steps already done."""
    _, client_state = engine.load_checkpoint(cfg.save_path, tag=tag)
    rng = torch.load(Path(cfg.save_path) / tag / STATE_NAME.format(rank=dist.get_rank()), weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return client_state["global_step"]


def train_step(engine, batches: list[dict], world: int) -> tuple[float, float]:
    """One optimizer step over this rank's micro-batches; returns (mean token loss, supervised tokens)."""
    gas = engine.gradient_accumulation_steps()
    # Every supervised token of the optimizer step weighs the same, whichever rank and
    # micro-batch it landed in: normalise by the step's total, not per micro-batch.
    n_tokens = all_reduce_sum(sum((b["labels"] != IGNORE_INDEX).sum() for b in batches), engine.device)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(batches):
        # A packed step has as many micro-batches as its samples need: say which one ends it.
        engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
        ce = sft_ce_sum(engine, model_inputs(batch, engine.device), batch["labels"].to(engine.device))
        # DeepSpeed divides by gas and averages over ranks; undo both so the gradient is sum / n_tokens.
        engine.backward(ce * (gas * world / n_tokens))
        engine.step()
        loss_sum += ce.detach().double().cpu()
    return all_reduce_sum(loss_sum, engine.device) / n_tokens, n_tokens


@torch.no_grad()
def eval_loss(engine, eval_set: SFTDataset, cfg: TrainConfig, world: int, rank: int) -> float:
    """Mean token loss over the whole eval set; every rank runs the same number of forwards (ZeRO-3 gathers)."""
    per_pass = cfg.micro_batch_size * world
    everything = -(-len(eval_set) // per_pass) * per_pass
    plan = plan_epoch(len(eval_set), 0, cfg.seed, everything, cfg.micro_batch_size, world, rank)[0]
    engine.eval()
    ce, n = torch.zeros((), dtype=torch.float64), 0
    for batch in micro_batches(eval_set, plan):
        ce += sft_ce_sum(engine, model_inputs(batch, engine.device), batch["labels"].to(engine.device)).double().cpu()
        n += (batch["labels"] != IGNORE_INDEX).sum().item()
    engine.train()
    return all_reduce_sum(ce, engine.device) / all_reduce_sum(n, engine.device)


def train(cfg: TrainConfig, data: Prepared) -> None:
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    engine = build_engine(cfg, data.ds_config)
    dataset, save, total_steps = data.train_set, Path(cfg.save_path), data.total_steps
    per_epoch = steps_per_epoch(len(dataset), cfg.batch_size)
    step = resume(engine, cfg, data.resume_tag) if data.resume_tag else 0
    (save / "logs").mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(save / "logs", enabled=rank == 0)
    split = (f"batch {cfg.batch_size} packed into rows of up to {token_budget(cfg)} tokens" if cfg.pack else
             f"{world} ranks x {engine.gradient_accumulation_steps()} accumulation x {cfg.micro_batch_size} = "
             f"batch {cfg.batch_size}")
    if rank == 0:
        save_model_metadata(engine.module, data.tokenizer, cfg.model_path, save)
        (save / CONFIG_NAME).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (save / DS_CONFIG_NAME).write_text(json.dumps(data.ds_config, indent=2) + "\n")
        print(f"{len(dataset)} samples ({dataset.num_skipped} skipped: prompt longer than max_length, "
              f"{dataset.num_truncated} truncated), {len(data.eval_set or [])} eval samples; {split}; "
              f"{total_steps} steps, starting at {step}")
    # Redrawn often on a terminal; in a log file every redraw is a line, so rarely.
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 60)
    plan, plan_for, tokens_seen, t0 = None, None, 0, time.time()
    micro_steps, tokens_in, padding = 0, 0, 0  # this rank's, for the throughput line
    loss = last_eval = float("nan")
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, per_epoch)
        if plan_for != epoch:
            if cfg.pack:
                lengths = [len(s.input_ids) for s in dataset.samples]
                plan = plan_packed_epoch(lengths, epoch, cfg.seed, cfg.batch_size, token_budget(cfg), world, rank)
            else:
                plan = plan_epoch(len(dataset), epoch, cfg.seed, cfg.batch_size, cfg.micro_batch_size, world, rank)
            plan_for = epoch
        batches = (packed_micro_batches if cfg.pack else micro_batches)(dataset, plan[step_in_epoch])
        n_in, n_pad = token_counts(batches)
        micro_steps, tokens_in, padding = micro_steps + len(batches), tokens_in + n_in, padding + n_pad
        log_sample_ids(cfg.save_path, rank, step + 1, [i for b in batches for i in b["sample_ids"]])
        loss, n_tokens = train_step(engine, batches, world)
        step += 1
        tokens_seen += n_tokens
        if not math.isfinite(loss):
            raise TrainingError(f"non-finite loss {loss} at step {step}; stopping, the last good checkpoint is kept")
        lr, tok_s = engine.get_lr()[0], tokens_seen / (time.time() - t0)
        metrics.log(step, "train", loss=loss, lr=lr, grad_norm=float(engine.get_global_grad_norm() or 0.0),
                    tokens_per_s=tok_s, supervised_tokens=n_tokens)
        if step % cfg.logging_steps == 0 or step == total_steps:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            if rank == 0:
                tqdm.write(f"step {step}/{total_steps} epoch {epoch} loss {loss:.4f} lr {lr:.3e}")
        if data.eval_set and (step == total_steps or cfg.eval_steps and step % cfg.eval_steps == 0):
            last_eval = eval_loss(engine, data.eval_set, cfg, world, rank)
            metrics.log(step, "eval", loss=last_eval)
            if rank == 0:
                tqdm.write(f"step {step}/{total_steps} eval loss {last_eval:.4f}")
        bar.update(1)
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            save_checkpoint(engine, cfg, step, epoch, len(dataset))
    elapsed = time.time() - t0
    bar.close()
    tag = save_checkpoint(engine, cfg, step, cfg.epochs, len(dataset))
    if cfg.lora_r:
        save_adapter(engine, save)
    metrics.close()
    tokens_in, padding = all_reduce_sum(tokens_in, engine.device), all_reduce_sum(padding, engine.device)
    if rank == 0:
        print(f"throughput: {micro_steps} micro-steps per rank, {tokens_in:.0f} tokens processed "
              f"({padding:.0f} padding), {tokens_seen:.0f} supervised, {elapsed:.2f}s training")
        plot = plot_losses(save / "logs", save / "loss.png")
        print(f"done: {step} steps, {step * cfg.batch_size} sample slots, {tokens_seen:.0f} supervised tokens this "
              f"run in {time.time() - t0:.0f}s; final train loss {loss:.4f}"
              f"{f', eval loss {last_eval:.4f}' if data.eval_set else ''}; "
              f"checkpoint {save / tag}, plot {plot}, TensorBoard {save / 'logs'}")
        print(f"convert with: python {save}/zero_to_fp32.py {save} {save}/pytorch_model.bin")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
        single_process_env()
        data = prepare(cfg, int(os.environ["WORLD_SIZE"]))
    except (ConfigError, DataError, ModelPathError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        train(cfg, data)
    except TrainingError as err:
        print(f"error (rank {os.environ['RANK']}): {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
