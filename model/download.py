"""Fetch an OpenLLaMA checkpoint from the Hugging Face hub into a local folder.

    python -m model.download openlm-research/open_llama_7b ./openllama_ckpt

Needs internet; says so in one line when the hub cannot be reached. The folder then gets the
exact ``tokenizer.json`` and the chat template (``model.hf_tokenizer``, original layout), so
``AutoTokenizer`` and the tools built on it give sentencepiece's ids for the base model too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    except (OSError, ValueError) as err:  # offline, missing, gated, HTTP errors (OSError); bad id (ValueError)
        print(f"error: could not download {args.model_id} into {args.out_dir}: {type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''} (no internet? see openllama_ckpt/README.md)",
              file=sys.stderr)
        return 1
    where = f"{path}/{subfolder}" if subfolder else path
    print(f"downloaded {args.model_id} to {where}" + (f"; move its files up into {args.out_dir}" if subfolder else ""))
    from model.hf_tokenizer import write_hf_tokenizer
    from model.tokenizer import SP_MODEL

    if (Path(where) / SP_MODEL).is_file():
        written = write_hf_tokenizer(where, "original")
        print(f"wrote {', '.join(written)} (exact tokenizer, chat template; scripts/exact_tokenizer.sh --layout clean "
              "for the fast recipe's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
