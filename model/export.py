"""Export a DeepSpeed ZeRO-3 checkpoint straight to a Hugging Face folder, with bounded memory.

The seed's route (``zero_to_fp32.py`` to one fp32 file, then ``make_shards.sh`` reading it back)
holds the whole fp32 model in memory at least once. This module goes from the rank files to an
HF folder (shards + index, config.json, generation_config.json, tokenizer files) in one pass and
never holds the model:

* The rank files are read by DeepSpeed's own converter in lazy mode
  (``get_fp32_state_dict_from_zero_checkpoint(..., lazy_mode=True)``): it maps the optimizer
  files with ``torch.load(mmap=True)`` and returns one ``GatheredTensor`` per weight, which
  stitches that weight's slices from every rank only when asked. Mapped file pages are page
  cache, which the kernel can drop; only the weight being written is anonymous memory.
* Shards are planned on ``meta`` tensors (shapes and dtypes only) with ``huggingface_hub``'s
  splitter, so the shard file names and the index are the ones ``from_pretrained`` expects.
* safetensors shards are written by a small streaming writer: the header is known from the
  plan, then each weight is gathered, cast and written, and dropped before the next one.
  Peak memory is about one weight (the largest, the embedding or lm_head), whatever
  ``--max_shard_size`` is. ``.bin`` shards (``--bin``) go through ``torch.save``, which needs a
  whole shard as a dict, so there the peak is about one shard.
* Everything is written into a temp folder beside OUT_DIR and renamed at the end: a failed or
  interrupted export leaves no half folder behind.

Weights that DeepSpeed lists under two names (tied weights: ``shared_params``) are written once,
under the name that owns the parameter; ``from_pretrained`` re-ties the other from the config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import yaml

from model.dtypes import CONFIG_DTYPE_NAMES
from model.dtypes import TORCH_DTYPES as DTYPES
from model.hf_tokenizer import write_hf_tokenizer
from model.lora import merge_lora
from model.tokenizer import SP_MODEL, TOKENIZER_FILES

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
MODEL_FILES = ("config.json", "generation_config.json")
RUN_RECORD = "train_config.yaml"  # the run's config: inference.py reads the layout from it
WEIGHT_PATTERNS = {"safetensors": "model{suffix}.safetensors", "bin": "pytorch_model{suffix}.bin"}
INDEX_NAMES = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}


class ExportError(ValueError):
    """A problem with the inputs, phrased for the user (it names the path)."""


def train_config(save_path: str | Path) -> dict[str, Any]:
    """The run's resolved config (``SAVE_PATH/train_config.yaml``); empty for older save paths."""
    path = Path(save_path) / "train_config.yaml"
    config = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return config if isinstance(config, dict) else {}


def trained_layout(save_path: str | Path) -> str:
    """The prompt layout recorded next to a checkpoint (``train_config.yaml``); ``original``
    without a record: the published checkpoints, queried as the seed README's snippet does."""
    return str(train_config(save_path).get("layout", "original"))


def add_exact_tokenizer(save_path: Path, out: Path) -> list[str]:
    """Write the exact ``tokenizer.json`` and the run's chat template into ``out`` (from its
    ``tokenizer.model``), so a save path written before the trainer did so exports exact too."""
    return write_hf_tokenizer(out, trained_layout(save_path)) if (out / SP_MODEL).is_file() else []


def training_dtype(save_path: str | Path) -> str:
    """The dtype the run trained in: ``dtype`` in ``SAVE_PATH/train_config.yaml``, else fp32.

    The trainer records it there; a save path without the file or the key predates that and
    trained in fp32.
    """
    path = Path(save_path) / "train_config.yaml"
    dtype = train_config(save_path).get("dtype", "fp32")
    if dtype not in DTYPES:
        raise ExportError(f"{path}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return str(dtype)


def resolve_tag(save_path: Path, tag: str | None) -> str:
    """The checkpoint tag to read: ``tag`` if given, else the one named in ``latest``."""
    if tag is None:
        latest = save_path / "latest"
        if not latest.is_file():
            raise ExportError(f"{save_path}: no 'latest' file; pass --tag (one of the global_step* folders)")
        tag = latest.read_text().strip()
    if not (save_path / tag).is_dir():
        raise ExportError(f"{save_path / tag}: checkpoint tag folder not found")
    return tag


def check_save_path(save_path: Path) -> None:
    """Fail before reading any weights when the folder lacks what the export copies."""
    if not save_path.is_dir():
        raise ExportError(f"{save_path}: save path not found")
    if not (save_path / "config.json").is_file():
        raise ExportError(f"{save_path}: no config.json (the trainer copies it from the base model)")
    if not any((save_path / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise ExportError(f"{save_path}: no tokenizer.model or tokenizer.json")


def lazy_state_dict(save_path: Path, tag: str) -> dict[str, Any]:
    """DeepSpeed's lazy consolidated state dict, each weight under one name only.

    Values are ``GatheredTensor`` (weights, gathered on ``.contiguous()``) or real tensors
    (buffers). A tied weight appears under a second name as the very same object; the first
    name, the parameter DeepSpeed saved, is kept.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(save_path), tag=tag, lazy_mode=True)
    seen: set[int] = set()
    unique = {}
    for name, value in lazy.items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        unique[name] = value
    return unique


def target_dtype(value: Any, dtype: torch.dtype) -> torch.dtype:
    """Floating weights are cast to the export dtype; integer and bool buffers keep theirs."""
    return dtype if value.dtype.is_floating_point else value.dtype


def materialize(value: Any, dtype: torch.dtype, compact: bool) -> torch.Tensor:
    """Gather one weight from the rank slices and cast it to ``dtype`` (floating weights only).

    ``GatheredTensor.contiguous()`` returns a view into the padded concatenation of the rank
    slices. The streaming writer copies out only the view's bytes, but ``torch.save`` writes a
    view's whole storage, so ``compact`` clones a view that does not own exactly its storage.
    """
    tensor = value.contiguous().to(target_dtype(value, dtype))
    if compact and tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


@dataclass
class ShardPlan:
    """Which weights go to which file, in the names ``from_pretrained`` looks for."""

    filename_to_names: dict[str, list[str]]
    total_size: int

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: filename for filename, names in self.filename_to_names.items() for name in names}


def plan_shards(lazy: dict[str, Any], dtype: torch.dtype, fmt: str, max_shard_size: str | int) -> ShardPlan:
    """Split by size on ``meta`` tensors (no memory), with huggingface_hub's file naming.

    A single shard keeps the single-file name (``model.safetensors`` / ``pytorch_model.bin``);
    the index is written either way, so every export has the same shape.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    shapes = {
        name: torch.empty(tuple(value.shape), dtype=target_dtype(value, dtype), device="meta")
        for name, value in lazy.items()
    }
    split = split_torch_state_dict_into_shards(
        shapes, filename_pattern=WEIGHT_PATTERNS[fmt], max_shard_size=max_shard_size
    )
    return ShardPlan(
        filename_to_names={f: list(names) for f, names in split.filename_to_tensors.items()},
        total_size=int(split.metadata["total_size"]),
    )


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous tensor, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_safetensors_streaming(
    path: Path, entries: Iterable[tuple[str, Any]], dtype: torch.dtype, metadata: dict[str, str]
) -> None:
    """Write one safetensors file, holding one weight in memory at a time.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the raw bytes in that order. Shapes and dtypes are known
    before any weight is gathered, so the header goes first and each weight is gathered, written
    and freed in turn. Tensors are ordered by element size (largest first) and the header is
    padded to 8 bytes, as the safetensors library does, so every tensor stays aligned.
    """
    if sys.byteorder != "little":
        raise ExportError("safetensors stores little-endian data; this machine is big-endian")
    ordered = sorted(entries, key=lambda e: (-target_dtype(e[1], dtype).itemsize, e[0]))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, value in ordered:
        out_dtype = target_dtype(value, dtype)
        nbytes = math.prod(value.shape) * out_dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[out_dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-(8 + len(header_bytes)) % 8)
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for name, value in ordered:
            tensor = materialize(value, dtype, compact=False)
            if list(tensor.shape) != header[name]["shape"]:
                raise ExportError(f"{name}: gathered shape {list(tensor.shape)} != planned {header[name]['shape']}")
            f.write(_tensor_bytes(tensor))
            del tensor
        _fsync(f)


def write_bin_shard(path: Path, entries: Iterable[tuple[str, Any]], dtype: torch.dtype) -> None:
    """Write one pickled ``.bin`` shard; ``torch.save`` needs the whole shard as one dict."""
    shard = {name: materialize(value, dtype, compact=True) for name, value in entries}
    with open(path, "wb") as f:
        torch.save(shard, f)
        _fsync(f)


def _fsync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def export_config(save_path: Path, out: Path, dtype_name: str) -> None:
    """config.json with the export dtype (``dtype`` for transformers 5.x, ``torch_dtype`` for 4.x)."""
    config = json.loads((save_path / "config.json").read_text())
    config["dtype"] = CONFIG_DTYPE_NAMES[dtype_name]
    config["torch_dtype"] = CONFIG_DTYPE_NAMES[dtype_name]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(save_path: Path, out: Path) -> list[str]:
    """generation_config.json, the run's train_config.yaml and whichever tokenizer files the save path has."""
    copied = []
    for name in ("generation_config.json", RUN_RECORD, *TOKENIZER_FILES):
        if (save_path / name).is_file():
            shutil.copy2(save_path / name, out / name)
            copied.append(name)
    return copied


def _occupied(out: Path) -> bool:
    """``out`` exists and is not an empty folder (an empty one is simply replaced)."""
    return out.exists() and not (out.is_dir() and not any(out.iterdir()))


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp folder to ``out``; an old ``out`` is removed only after that."""
    if not _occupied(out):
        os.replace(tmp, out)
        return
    if not overwrite:
        raise ExportError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def export(
    save_path: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    fmt: str = "safetensors",
    max_shard_size: str | int = "5GB",
    tag: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an HF folder for the ZeRO checkpoint in ``save_path`` to ``out_dir``; returns it."""
    save_path, out = Path(save_path).resolve(), Path(out_dir).resolve()
    check_save_path(save_path)
    if out == save_path or out in save_path.parents:
        raise ExportError(f"{out}: OUT_DIR must not be SAVE_PATH or hold it (the export replaces OUT_DIR as a whole)")
    if _occupied(out) and not overwrite:
        raise ExportError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    dtype_name = dtype or training_dtype(save_path)
    if dtype_name not in DTYPES:
        raise ExportError(f"dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype_name]
    tag = resolve_tag(save_path, tag)

    lazy = lazy_state_dict(save_path, tag)
    config = train_config(save_path)
    if config.get("lora_r"):  # a LoRA run: fold the adapters in, under the base model's names
        lazy = merge_lora(lazy, config["lora_r"], config["lora_alpha"])
    plan = plan_shards(lazy, torch_dtype, fmt, max_shard_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for i, (filename, names) in enumerate(plan.filename_to_names.items(), 1):
            entries = [(name, lazy[name]) for name in names]
            if fmt == "safetensors":
                write_safetensors_streaming(tmp / filename, entries, torch_dtype, {"format": "pt"})
            else:
                write_bin_shard(tmp / filename, entries, torch_dtype)
            for name in names:
                del lazy[name]
            print(f"[export] wrote {filename} ({i}/{len(plan.filename_to_names)}, {len(names)} tensors)", flush=True)
        index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map}
        (tmp / INDEX_NAMES[fmt]).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        export_config(save_path, tmp, dtype_name)
        copied = copy_side_files(save_path, tmp)
        copied += [name for name in add_exact_tokenizer(save_path, tmp) if name not in copied]
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"[export] {save_path}/{tag} -> {out}: {dtype_name}, {fmt}, {len(plan.filename_to_names)} shard(s), "
        f"{plan.total_size} bytes of weights, config.json + {', '.join(copied)}",
        flush=True,
    )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="export_hf.sh",
        description="Export a DeepSpeed ZeRO-3 checkpoint to a Hugging Face folder that from_pretrained loads, "
        "streaming weight by weight.",
    )
    parser.add_argument(
        "save_path", help="the trainer's --save_path: tag folders, 'latest', config and tokenizer files"
    )
    parser.add_argument("out_dir", help="HF folder to create (written beside it in a temp folder, then renamed)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of the exported weights (default: the training dtype from SAVE_PATH/train_config.yaml, else fp32)",
    )
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument(
        "--safetensors",
        dest="fmt",
        action="store_const",
        const="safetensors",
        help="model-0000X-of-0000N.safetensors shards (default; streamed one weight at a time)",
    )
    fmt.add_argument(
        "--bin",
        dest="fmt",
        action="store_const",
        const="bin",
        help="the seed's pytorch_model-0000X-of-0000N.bin shards (pickle; one shard in memory at a time)",
    )
    parser.set_defaults(fmt="safetensors")
    parser.add_argument("--max_shard_size", default="5GB", help="largest shard file, e.g. 2GB or 500MB (default 5GB)")
    parser.add_argument("--tag", default=None, help="checkpoint tag folder, e.g. global_step40 (default: 'latest')")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export(
            args.save_path,
            args.out_dir,
            dtype=args.dtype,
            fmt=args.fmt,
            max_shard_size=args.max_shard_size,
            tag=args.tag,
            overwrite=args.overwrite,
        )
    except ExportError as err:
        print(f"export_hf: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
