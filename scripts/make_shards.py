"""Split ``{SAVE_PATH}/pytorch_model.bin`` into the seed's ``pytorch_model-0000X-of-0000N.bin`` shards.

The second step of the seed README's route (after ``zero_to_fp32.py``), called by
``scripts/make_shards.sh``. The result is a folder ``from_pretrained`` loads: shards,
``pytorch_model.bin.index.json``, config.json, generation_config.json and the tokenizer files.

* The consolidated file is opened with ``torch.load(mmap=True)``: its tensors stay file pages
  the kernel can drop, rather than a second copy of the model in anonymous memory.
* Shards are written by ``huggingface_hub.save_torch_state_dict(safe_serialization=False)`` into
  a temp folder first: that function deletes files matching ``pytorch_model*.bin`` in the folder
  it writes to, which would include the consolidated file being read.
* The index is always written, even for one shard (then named ``-00001-of-00001``), so the
  output has one shape whatever the size.
* Writing into the save path itself (the default), the consolidated ``pytorch_model.bin`` is
  removed last, once every shard and the index are in place: ``from_pretrained`` prefers a
  ``pytorch_model.bin`` over an index, so leaving it would make the shards dead weight.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict

CONSOLIDATED = "pytorch_model.bin"
INDEX = "pytorch_model.bin.index.json"
SHARD_RE = re.compile(r"pytorch_model-\d{5}-of-\d{5}\.bin")
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def write_shards(state_dict: dict[str, torch.Tensor], tmp: Path, max_shard_size: str) -> dict[str, str]:
    """Shards + index into the empty folder ``tmp``; returns the index's weight map."""
    save_torch_state_dict(state_dict, tmp, safe_serialization=False, max_shard_size=max_shard_size)
    if (tmp / CONSOLIDATED).is_file():
        single = "pytorch_model-00001-of-00001.bin"
        os.replace(tmp / CONSOLIDATED, tmp / single)
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        index = {"metadata": {"total_size": total}, "weight_map": {name: single for name in state_dict}}
        (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return json.loads((tmp / INDEX).read_text())["weight_map"]


def make_shards(save_path: str | Path, out_dir: str | Path | None = None, max_shard_size: str = "2GB") -> Path:
    """Shard ``save_path/pytorch_model.bin`` into ``out_dir`` (default: ``save_path``)."""
    save_path = Path(save_path).resolve()
    out = Path(out_dir).resolve() if out_dir is not None else save_path
    source = save_path / CONSOLIDATED
    if not source.is_file():
        sys.exit(
            f"{source}: not found (run `python {save_path}/zero_to_fp32.py {save_path} {source}` first)"
        )
    out.mkdir(parents=True, exist_ok=True)
    state_dict = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shards-", dir=out))
    try:
        weight_map = write_shards(state_dict, tmp, max_shard_size)
        del state_dict
        for stale in out.iterdir():
            if SHARD_RE.fullmatch(stale.name) or stale.name == INDEX:
                stale.unlink()
        for shard in sorted(set(weight_map.values())):
            os.replace(tmp / shard, out / shard)
        os.replace(tmp / INDEX, out / INDEX)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if out != save_path:
        for name in SIDE_FILES:
            if (save_path / name).is_file():
                shutil.copy2(save_path / name, out / name)
    else:
        source.unlink()
        print(f"[make_shards] removed {source}: the shards and {INDEX} replace it")
    print(f"[make_shards] {len(set(weight_map.values()))} shard(s) + {INDEX} in {out}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make_shards.sh",
        description="Split SAVE_PATH/pytorch_model.bin into pytorch_model-0000X-of-0000N.bin shards + index.",
    )
    parser.add_argument(
        "save_path",
        nargs="?",
        default="./ckpt/openalpaca",
        help="folder holding pytorch_model.bin (default ./ckpt/openalpaca)",
    )
    parser.add_argument(
        "--out_dir",
        default=None,
        help="where the shards go (default: SAVE_PATH, and pytorch_model.bin is removed once they are written); "
        "another folder also gets config.json, generation_config.json and the tokenizer files",
    )
    parser.add_argument("--max_shard_size", default="2GB", help="largest shard, e.g. 2GB or 500MB (default 2GB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    make_shards(args.save_path, args.out_dir, args.max_shard_size)


if __name__ == "__main__":
    main()
