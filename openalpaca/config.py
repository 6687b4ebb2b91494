"""The typed training config: YAML file + CLI overrides, and the DeepSpeed JSON derived from it.

``config/openllama.yaml`` holds the run (epochs, max length, batch, lr, seed, saving); the
DeepSpeed JSON holds the engine (ZeRO stage, optimizer type, betas, clipping). Every value the
two share is ``"auto"`` in the JSON and filled in from the YAML here, as the Hugging Face
Trainer does; a number written in the JSON instead must agree with the YAML, or the run stops
before any model is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from openalpaca.conversations import check_choices
from openalpaca.data import EPOCH_TAILS, WEIGHTINGS
from openalpaca.prompts import SampleFormat

DTYPES = ("bf16", "fp16", "fp32")
WARMUP_TYPES = ("log", "linear")  # DeepSpeed WarmupDecayLR's warmup_type values


class ConfigError(ValueError):
    """A config problem, phrased for the user: it names the file and the key."""


@dataclass
class TrainConfig:
    # where things are (the seed's three flags)
    model_path: str = "./openllama_ckpt"
    data_path: str = "./openalpaca.json"
    # the data files' format (openalpaca/conversations.py): auto reads it from the first record
    data_format: str = "auto"  # auto | alpaca | messages (OpenAI) | sharegpt
    system_message: str = "refuse"  # a conversation's system message: refuse (an error) | prepend (to turn 1)
    save_path: str = "./ckpt/openalpaca"
    ds_config: str = "dsconfig/openllama.json"
    # the seed's hyper-parameters
    epochs: int = 2
    max_length: int = 1024
    batch_size: int = 64  # samples per optimizer step, over all ranks
    micro_batch_size: int = 1  # samples per forward pass on one rank
    lr: float = 2e-5
    # warmup = max(warmup_steps, int(warmup_ratio * total steps)), as the original computed it
    warmup_steps: int = 10
    warmup_ratio: float = 0.1
    warmup_type: str = "log"  # DeepSpeed's default shape (log) or linear
    dtype: str = "bf16"
    seed: int = 0
    gradient_checkpointing: bool = False
    # the recipe's choices; the defaults are the original code's (config/openllama.yaml)
    layout: str = "original"  # token layout (openalpaca/prompts.py): original [1,1,P,2,1,1,O,2] or clean [1,P,2,1,O,2]
    truncation: str = "keep_end"  # keep_end: the last max_length tokens; keep_prompt: cut the response
    hide_eos_keys: bool = True  # attention_mask = input_ids != eos, as the original's collator
    loss_weighting: str = "sample"  # sample: every sample weighs the same in a step; token: every token
    epoch_tail: str = "carry"  # carry: steps run across epochs (epochs * N // batch steps); pad: partial last step
    # ZeRO-3 hooks every module to gather its parameters; classes named here (comma-separated,
    # e.g. LlamaDecoderLayer) are gathered as one unit instead: far fewer hooks, same numbers.
    zero3_leaf_modules: str = ""
    # Settings put into the DeepSpeed JSON's zero_optimization block, e.g. for a small model on CPU:
    # "overlap_comm=false, contiguous_gradients=false". Values are JSON (true, 0, 5e7); the names
    # must be DeepSpeed's; the batch, lr and schedule are not here: they come from this config.
    zero_overrides: str = ""
    # throughput (openalpaca/packing.py): same samples per step, fewer and fuller micro-batches
    pack: bool = False  # several samples per micro-batch row, each attending only to itself
    max_tokens_per_micro_batch: int = 0  # token budget of a packed row; 0: max_length
    # evaluation: a held-out split of data_path, or a file of its own
    eval_ratio: float = 0.0  # share of data_path held out for eval loss (seeded)
    eval_data_path: str = ""  # eval file (any data_format); wins over eval_ratio
    eval_steps: int = 0  # eval loss every N optimizer steps; 0: at the end only
    # LoRA (peft): r 0 is a full fine-tune. In YAML: `lora: {r: 8, alpha: 16, dropout: 0.05,
    # target_modules: [q_proj, v_proj]}`; on the command line: --lora_r 8 ...
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated module names
    # bookkeeping
    logging_steps: int = 1
    save_steps: int = 0  # 0: save only at the end
    keep_last: int = 2  # checkpoints kept on disk (the final one always stays)
    resume: bool = False  # continue from `latest` in save_path

    def __post_init__(self) -> None:
        problems = []
        # warmup_steps >= 1: DeepSpeed's WarmupDecayLR refuses 0
        for name in ("epochs", "max_length", "batch_size", "micro_batch_size", "logging_steps", "keep_last",
                     "warmup_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_steps", "eval_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lora_r < 0 or self.lora_alpha < 1 or not 0 <= self.lora_dropout < 1:
            problems.append(f"lora needs r >= 0, alpha >= 1, 0 <= dropout < 1, got r {self.lora_r}, "
                            f"alpha {self.lora_alpha}, dropout {self.lora_dropout}")
        if not 0 <= self.eval_ratio < 1:
            problems.append(f"eval_ratio must be in [0, 1), got {self.eval_ratio}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        for name, allowed in (("dtype", DTYPES), ("warmup_type", WARMUP_TYPES), ("loss_weighting", WEIGHTINGS),
                              ("epoch_tail", EPOCH_TAILS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for check in (self.sample_format, lambda: check_choices(self.data_format, self.system_message)):
            try:
                check()
            except ValueError as err:
                problems.append(str(err))
        if self.max_tokens_per_micro_batch < 0:
            problems.append(f"max_tokens_per_micro_batch must be >= 0, got {self.max_tokens_per_micro_batch}")
        elif self.max_tokens_per_micro_batch and not self.pack:
            problems.append("max_tokens_per_micro_batch needs pack: true")
        elif 0 < self.max_tokens_per_micro_batch < self.max_length:
            problems.append(f"max_tokens_per_micro_batch must be 0 (max_length) or >= max_length {self.max_length} "
                            f"so that every sample fits a row, got {self.max_tokens_per_micro_batch}")
        try:
            parse_zero_overrides(self.zero_overrides)
        except ValueError as err:
            problems.append(str(err))
        if self.pack and self.micro_batch_size != 1:
            problems.append(f"micro_batch_size must be 1 with pack: true (the token budget decides how many "
                            f"samples a micro-batch holds), got {self.micro_batch_size}")
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sample_format(self) -> SampleFormat:
        return SampleFormat(self.layout, self.truncation, self.hide_eos_keys)

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``: the original's ``max(10, int(0.1 * total))``.

        Not cut to the total, as in the original: a run shorter than its warmup never reaches ``lr``.

        >>> TrainConfig().warmup(468), TrainConfig().warmup(50), TrainConfig(warmup_ratio=0.0).warmup(468)
        (46, 10, 10)
        """
        return max(self.warmup_steps, int(self.warmup_ratio * total_steps))


def split_pairs(text: str) -> list[tuple[str, str, str, str]]:
    """``"a=1, b = 2"`` -> ``[("a=1", "a", "=", "1"), ("b = 2", "b", "=", "2")]``: each comma-separated
    item with its key, its ``=`` (empty when missing) and its value, stripped; empty items skipped.

    >>> split_pairs("a=1, b = 2,, c")
    [('a=1', 'a', '=', '1'), ('b = 2', 'b', '=', '2'), ('c', 'c', '', '')]
    """
    return [(item, *(piece.strip() for piece in item.partition("="))) for item in
            filter(None, (part.strip() for part in text.split(",")))]


def parse_zero_overrides(text: str) -> dict[str, Any]:
    """``"overlap_comm=false, reduce_bucket_size=5e7"`` -> ``{"overlap_comm": False, "reduce_bucket_size": 5e7}``.

    >>> parse_zero_overrides("stage3_param_persistence_threshold=0, overlap_comm=false")
    {'stage3_param_persistence_threshold': 0, 'overlap_comm': False}
    """
    overrides: dict[str, Any] = {}
    for item, key, sep, value in split_pairs(text):
        try:
            parsed = json.loads(value) if sep and key else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, (bool, int, float)):
            raise ValueError(f"zero_overrides: {item!r} is not KEY=VALUE with a JSON number or true/false")
        if key == "stage":
            raise ValueError("zero_overrides: the ZeRO stage belongs in the DeepSpeed JSON, not here")
        overrides[key] = parsed
    return overrides


def _zero_config_keys() -> set[str]:
    """Every key DeepSpeed accepts in ``zero_optimization`` (field names and their JSON aliases)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return set(DeepSpeedZeroConfig.model_fields) | {
        f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias
    }


def _check_type(name: str, value: Any, typ: type, source: str) -> Any:
    """YAML's value for ``name`` with the dataclass field's type, or a ConfigError."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise ConfigError(f"{source}: key {name!r} must be {typ.__name__}, got {value!r}")
    return value


FIELD_TYPES = {f.name: {"str": str, "int": int, "float": float, "bool": bool}[f.type] for f in fields(TrainConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config into checked field values; unknown keys and wrong types fail."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(raw).__name__}")
    raw = _flatten_lora(raw, path)
    unknown = sorted(set(raw) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(FIELD_TYPES)}")
    return {k: _check_type(k, v, FIELD_TYPES[k], str(path)) for k, v in raw.items()}


def _flatten_lora(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The YAML's ``lora:`` block becomes the flat ``lora_*`` fields (a list of modules, a string)."""
    if "lora" not in raw:
        return raw
    block, raw = raw["lora"], {k: v for k, v in raw.items() if k != "lora"}
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: key 'lora' must be a mapping of r, alpha, dropout, target_modules")
    for key, value in block.items():
        if f"lora_{key}" not in FIELD_TYPES:
            raise ConfigError(f"{path}: unknown key lora.{key}; known: r, alpha, dropout, target_modules")
        if key == "target_modules" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ",".join(value)
        raw[f"lora_{key}"] = value
    return raw


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


HELP = {
    "model_path": "HF folder (or hub id) of the base model: config.json, weights, tokenizer.model",
    "data_path": "training data, JSON list or JSONL (or parquet): Alpaca records (instruction, input, output) or "
                 "conversations (OpenAI messages, ShareGPT conversations); several files comma-separated; "
                 "docs/conversations.md",
    "data_format": "format of the data files: auto (each file's from its first record), alpaca, messages "
                   "(OpenAI {messages: [{role, content}]}) or sharegpt ({conversations: [{from, value}]})",
    "system_message": "a conversation's first-turn system message: refuse (stop with an error naming it) or "
                      "prepend (put it before the first instruction, a blank line between)",
    "loss_weighting": "sample: each sample (an Alpaca record or a whole conversation) weighs the same in a step; "
                      "token: every supervised token weighs the same",
    "truncation": "keep_end: the last max_length tokens (the original's); keep_prompt: cut the end of the answer "
                  "that does not fit (a conversation drops the later turns that have no room)",
    "save_path": "where checkpoints, the tokenizer, configs and logs are written",
    "ds_config": "DeepSpeed JSON; its 'auto' values are filled from this config",
    "resume": "continue from the `latest` checkpoint in save_path",
    "pack": "pack several samples into each micro-batch row (block-diagonal attention, no padding)",
    "zero_overrides": 'zero_optimization settings put into the DeepSpeed JSON, e.g. "overlap_comm=false"',
    "max_tokens_per_micro_batch": "token budget of one packed row, needs --pack true; 0: max_length",
}


class _ArgumentParser(argparse.ArgumentParser):
    """argparse's errors as a ``ConfigError`` (one line, exit 1 in train_sft.py), not a usage block and exit 2."""

    def error(self, message: str):
        raise ConfigError(message)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        description="Supervised fine-tuning with DeepSpeed ZeRO-3. Every config key can be overridden "
        "on the command line; flags win over the YAML file."
    )
    parser.add_argument("--config", default="config/openllama.yaml", help="YAML file with the run's settings")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    for f in fields(TrainConfig):
        typ = FIELD_TYPES[f.name]
        parser.add_argument(
            f"--{f.name}",
            type=_parse_bool if typ is bool else typ,
            default=None,
            help=f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: {f.default})",
        )
    return parser


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from ``--config`` YAML, then CLI flags on top."""
    args = build_arg_parser().parse_args(argv)
    values = load_yaml(args.config)
    values.update({k: v for k, v in vars(args).items() if k in FIELD_TYPES and v is not None})
    try:
        return TrainConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{args.config}: {err}") from None


# ---------------------------------------------------------------------------- DeepSpeed JSON


def gradient_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_step:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is not divisible by micro_batch_size {cfg.micro_batch_size} x "
            f"world size {world_size} = {per_step}; pick a batch_size that is a multiple of {per_step}"
        )
    return cfg.batch_size // per_step


@dataclass
class _Resolver:
    path: str
    problems: list[str] = field(default_factory=list)

    def fill(self, section: dict, key: str, value: Any, where: str) -> None:
        """Set ``section[key]`` to ``value`` if it is missing or "auto"; else it must agree."""
        current = section.get(key, "auto")
        if current == "auto":
            section[key] = value
        elif current != value and not (isinstance(value, float) and math.isclose(current, value, rel_tol=1e-9)):
            self.problems.append(f"{where}{key} is {current!r} but the training config gives {value!r}")


def resolve_ds_config(
    raw: dict[str, Any], cfg: TrainConfig, world_size: int, total_steps: int, path: str = "<ds_config>"
) -> dict[str, Any]:
    """The DeepSpeed config with every "auto" filled from ``cfg``; disagreements fail, naming the key."""
    ds = json.loads(json.dumps(raw))
    overrides = parse_zero_overrides(cfg.zero_overrides)
    if overrides:
        unknown = sorted(set(overrides) - _zero_config_keys())
        if unknown:
            raise ConfigError(f"zero_overrides: DeepSpeed has no zero_optimization setting {', '.join(unknown)}")
        ds.setdefault("zero_optimization", {}).update(overrides)
    r = _Resolver(path)
    r.fill(ds, "train_batch_size", cfg.batch_size, "")
    r.fill(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, "")
    r.fill(ds, "gradient_accumulation_steps", gradient_accumulation_steps(cfg, world_size), "")
    optimizer = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    r.fill(optimizer.setdefault("params", {}), "lr", cfg.lr, "optimizer.params.")
    scheduler = ds.get("scheduler")
    if scheduler is not None:
        params = scheduler.setdefault("params", {})
        if "warmup_max_lr" in params:
            r.fill(params, "warmup_max_lr", cfg.lr, "scheduler.params.")
        if "warmup_num_steps" in params:
            r.fill(params, "warmup_num_steps", cfg.warmup(total_steps), "scheduler.params.")
        if "warmup_type" in params:
            r.fill(params, "warmup_type", cfg.warmup_type, "scheduler.params.")
        if "total_num_steps" in params:
            r.fill(params, "total_num_steps", total_steps, "scheduler.params.")
    for precision in ("bf16", "fp16"):
        r.fill(ds.setdefault(precision, {}), "enabled", cfg.dtype == precision, f"{precision}.")
    if r.problems:
        raise ConfigError(f"{path} disagrees with the training config: " + "; ".join(r.problems))
    return ds


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 2 or 3, got {stage!r}")
    return ds
