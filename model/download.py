"""Fetch an OpenLLaMA checkpoint from the Hugging Face hub into a local folder.

    python -m model.download openlm-research/open_llama_7b ./openllama_ckpt

Needs internet; says so in one line when the hub cannot be reached.
"""

from __future__ import annotations

import argparse
import sys

# The seed's preview weights live in a sub-folder of their hub repos.
PREVIEW_SUBFOLDERS = {
    "openlm-research/open_llama_7b_preview_200bt": "open_llama_7b_preview_200bt_transformers_weights",
    "openlm-research/open_llama_7b_preview_300bt": "open_llama_7b_preview_300bt_transformers_weights",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_id", nargs="?", default="openlm-research/open_llama_7b", help="hub repo id")
    p.add_argument("out_dir", nargs="?", default="./openllama_ckpt", help="local folder to fill")
    args = p.parse_args(argv)
    from huggingface_hub import snapshot_download

    subfolder = PREVIEW_SUBFOLDERS.get(args.model_id)
    try:
        path = snapshot_download(args.model_id, local_dir=args.out_dir,
                                 allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except Exception as err:  # the hub's errors vary (offline, 404, gated, auth); all mean "not fetched"
        print(f"error: could not download {args.model_id} into {args.out_dir}: {type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''} (no internet? see openllama_ckpt/README.md)",
              file=sys.stderr)
        return 1
    where = f"{path}/{subfolder}" if subfolder else path
    print(f"downloaded {args.model_id} to {where}" + (f"; move its files up into {args.out_dir}" if subfolder else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
