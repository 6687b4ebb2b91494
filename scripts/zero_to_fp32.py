#!/usr/bin/env python
"""Consolidate a DeepSpeed ZeRO checkpoint into fp32 weights; the seed README's command, made to work.

Why this file exists: the seed README converts with

    python {save_path}/zero_to_fp32.py {save_path} {save_path}/pytorch_model.bin

and expects ONE file, ``pytorch_model.bin``. The script DeepSpeed 0.19 ships takes an output
*directory* as its second argument, so that command would create a folder named
``pytorch_model.bin/`` holding ``pytorch_model.bin`` (or shards) inside. The trainer copies this
file into the save path instead, and it accepts both forms:

* ``CHECKPOINT_DIR OUTPUT_FILE`` (suffix ``.bin``, ``.pt`` or ``.safetensors``, not an existing
  directory): one file with the whole fp32 state dict (``torch.save``, or safetensors for
  ``.safetensors``), written to a temp file and renamed, so an interrupted run leaves no
  truncated ``pytorch_model.bin`` behind.
* ``CHECKPOINT_DIR OUTPUT_DIR`` (anything else): DeepSpeed's own behaviour, delegated to
  ``convert_zero_checkpoint_to_fp32_state_dict`` with ``--max_shard_size``,
  ``--safe_serialization`` and ``--exclude_frozen_parameters`` forwarded.

It runs from inside the save path, where the repository's modules are not importable, so it
imports only deepspeed, torch and the standard library. ``engine.save_checkpoint`` copies
DeepSpeed's own ``zero_to_fp32.py`` and ``zero_to_torch.py`` into the save path on every save, so
the trainer must copy this file over it *after* saving; and because that ``zero_to_torch.py`` does
``import zero_to_fp32`` and uses ``convert_zero_checkpoint_to_state_dict`` and
``OUTPUT_DTYPE_NAMES`` from it, this module re-exports those two names.

The one-file form needs the whole fp32 model in memory once; ``scripts/export_hf.sh`` streams
instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import deepspeed.utils.zero_to_fp32 as ds_zero_to_fp32
import torch
from deepspeed.utils.zero_to_fp32 import (  # the first two are re-exported for zero_to_torch.py
    OUTPUT_DTYPE_NAMES,
    convert_zero_checkpoint_to_fp32_state_dict,
    convert_zero_checkpoint_to_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
    to_torch_tensor,
)

FILE_SUFFIXES = (".bin", ".pt", ".safetensors")
DEFAULT_MAX_SHARD_SIZE = "5GB"
__all__ = ["OUTPUT_DTYPE_NAMES", "convert_zero_checkpoint_to_state_dict", "convert_to_file", "main"]


def is_file_target(output: str) -> bool:
    """The seed's form: a path with a weights-file suffix that is not an existing directory."""
    path = Path(output)
    return path.suffix in FILE_SUFFIXES and not path.is_dir()


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of a tensor shared under several names (tied weights).

    safetensors refuses shared storage; the first name is the parameter the checkpoint owns,
    the others are aliases DeepSpeed re-adds from ``shared_params``.
    """
    seen: set[int] = set()
    kept = {}
    for name, tensor in state_dict.items():
        if tensor.untyped_storage().data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        kept[name] = tensor
    return kept


def convert_to_file(checkpoint_dir: str, output_file: str, tag: str | None, exclude_frozen: bool) -> None:
    """Write the whole fp32 state dict as one file, atomically (temp file + ``os.replace``)."""
    lazy = get_fp32_state_dict_from_zero_checkpoint(
        checkpoint_dir, tag=tag, exclude_frozen_parameters=exclude_frozen, lazy_mode=True
    )
    state_dict = to_torch_tensor(lazy, dtype=torch.float32)
    del lazy
    target = Path(output_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        if target.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(unique_tensors(state_dict), tmp, metadata={"format": "pt"})
        else:
            torch.save(state_dict, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    numel = sum(t.numel() for t in unique_tensors(state_dict).values())
    print(f"Saved {len(state_dict)} tensors ({numel} elements, fp32) to {target}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Consolidate a DeepSpeed ZeRO checkpoint into fp32 weights: one file "
        "(CHECKPOINT_DIR OUTPUT_FILE.bin) or, as DeepSpeed's own script, a directory."
    )
    parser.add_argument("checkpoint_dir", help="folder holding the tag folders and 'latest', e.g. ./ckpt/openalpaca")
    parser.add_argument(
        "output",
        help="a file ending in .bin/.pt/.safetensors (one consolidated state dict), or a directory "
        "(DeepSpeed's form: shards + index inside it)",
    )
    parser.add_argument(
        "--max_shard_size",
        default=None,
        help=f"directory form only: largest shard, e.g. 2GB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument(
        "--safe_serialization",
        action="store_true",
        help="directory form only: write safetensors shards instead of pickled .bin",
    )
    parser.add_argument(
        "-t", "--tag", default=None, help="checkpoint tag, e.g. global_step40 (default: the 'latest' file)"
    )
    parser.add_argument(
        "--exclude_frozen_parameters", action="store_true", help="leave out parameters that were frozen"
    )
    parser.add_argument("-d", "--debug", action="store_true", help="DeepSpeed converter's debug printout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ds_zero_to_fp32.debug = args.debug
    if is_file_target(args.output):
        if args.max_shard_size is not None or args.safe_serialization:
            sys.exit(
                f"{args.output}: a single file was asked for; --max_shard_size and --safe_serialization "
                "apply to a directory output (or name a .safetensors file)"
            )
        convert_to_file(args.checkpoint_dir, args.output, args.tag, args.exclude_frozen_parameters)
    else:
        convert_zero_checkpoint_to_fp32_state_dict(
            args.checkpoint_dir,
            args.output,
            max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
            safe_serialization=args.safe_serialization,
            tag=args.tag,
            exclude_frozen_parameters=args.exclude_frozen_parameters,
        )


if __name__ == "__main__":
    main()
