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
* Writing into the save path itself (the default), what the original's ``make_shards.sh``
  removed goes last, once every shard and the index are in place: the consolidated
  ``pytorch_model.bin`` (``from_pretrained`` prefers it over an index, so leaving it would make
  the shards dead weight), the DeepSpeed checkpoint folders (``global_step*``, about 16 bytes
  per parameter: ~100 GB at 7B), ``latest`` and ``zero_to_fp32.py`` (and DeepSpeed's
  ``zero_to_torch.py``). Each removal is printed; ``--keep_deepspeed`` keeps the DeepSpeed state
  (to resume, or export again later).
* The default shard size is the original's, 5GB.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.export import MODEL_FILES, RUN_RECORD, add_exact_tokenizer
from model.tokenizer import TOKENIZER_FILES

CONSOLIDATED = "pytorch_model.bin"
INDEX = "pytorch_model.bin.index.json"
SHARD_RE = re.compile(r"pytorch_model-\d{5}-of-\d{5}\.bin")
SIDE_FILES = (*MODEL_FILES, RUN_RECORD, *TOKENIZER_FILES)  # copied along to another --out_dir


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


DEFAULT_SHARD_SIZE = "5GB"  # the original's


def deepspeed_state(save_path: Path) -> list[Path]:
    """The DeepSpeed checkpoint files of a save path: tag folders, ``latest``, the converter."""
    tags = sorted(p for p in save_path.glob("global_step*") if p.is_dir())
    latest = save_path / "latest"
    if latest.is_file() and (save_path / latest.read_text().strip()).is_dir():
        tags = sorted(set(tags) | {save_path / latest.read_text().strip()})
    converters = (save_path / "zero_to_fp32.py", save_path / "zero_to_torch.py")  # DeepSpeed drops both
    return tags + [p for p in (latest, *converters) if p.is_file()]


def make_shards(save_path: str | Path, out_dir: str | Path | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE,
                keep_deepspeed: bool = False) -> Path:
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
        if not keep_deepspeed:
            for path in deepspeed_state(save_path):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                print(f"[make_shards] removed {path} (DeepSpeed state; --keep_deepspeed keeps it)")
    add_exact_tokenizer(save_path, out)
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
        help="where the shards go (default: SAVE_PATH, where pytorch_model.bin and the DeepSpeed state are removed "
        "once they are written); another folder also gets config.json, generation_config.json, the tokenizer "
        "files and train_config.yaml, and nothing is removed",
    )
    parser.add_argument("--max_shard_size", default=DEFAULT_SHARD_SIZE,
                        help=f"largest shard, e.g. 2GB or 500MB (default {DEFAULT_SHARD_SIZE}, the original's)")
    parser.add_argument("--keep_deepspeed", action="store_true",
                        help="keep the DeepSpeed checkpoint folders, latest and zero_to_fp32.py in SAVE_PATH")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    make_shards(args.save_path, args.out_dir, args.max_shard_size, args.keep_deepspeed)


if __name__ == "__main__":
    main()
