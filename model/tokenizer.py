"""OpenLLaMA's tokenizer, with the ids the original OpenAlpaca code trained on.

The original loaded ``LlamaTokenizer`` (transformers 4.29), the slow class backed by
sentencepiece: for text without special tokens its ids are exactly
``SentencePieceProcessor.encode(text)``, with the model's own normaliser (OpenLLaMA v1 folds
runs of spaces and has a dummy prefix; v2 keeps whitespace). transformers 5.x has no slow
tokenizer any more: ``AutoTokenizer`` converts ``tokenizer.model`` into a ``tokenizers`` BPE
whose ids differ on newlines, runs of spaces and leading spaces for such models (every prompt
here holds ``\\n``), and OpenLLaMA's own README advises against the converted tokenizer.

So a folder with a ``tokenizer.model`` is read by sentencepiece itself
(``SentencePieceTokenizer``); only a folder without one (``tokenizer.json`` alone) goes through
``AutoTokenizer``. For the tools outside the project, ``model.hf_tokenizer`` writes a
``tokenizer.json`` that gives these same ids through ``AutoTokenizer``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BOS_ID = 1  # OpenLLaMA: <s>
EOS_ID = 2  # OpenLLaMA: </s>
PAD_ID = 0  # OpenLLaMA's config.json sets pad_token_id 0 (<unk>); pads are never attended or supervised
SP_MODEL = "tokenizer.model"
# The original's sampling (the seed README's generate call): generation_config.json, the GGUF engine's request
# defaults and the ollama Modelfile all take it from here; temperature 1 and no repetition penalty, as generate.
SAMPLING = {"top_k": 50, "top_p": 0.9, "max_new_tokens": 128, "temperature": 1.0, "repetition_penalty": 1.0}
# Everything a model folder may hold about its tokenizer (copied next to checkpoints and exports).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


class ModelPathError(ValueError):
    """The model folder (or its tokenizer) cannot be used; the message names the folder and the file."""


class SentencePieceTokenizer:
    """``tokenizer.model`` read by sentencepiece: the slow ``LlamaTokenizer``'s ids and text.

    ``encode(text)`` adds the bos as the original's tokenizer did (``add_bos_token`` was true);
    ``encode(text, add_special_tokens=False)`` is ``SentencePieceProcessor.encode(text)``.
    ``decode`` renders control tokens as their pieces (``<s>``, ``</s>``) unless
    ``skip_special_tokens``, decoding the text between them piece by piece as the slow class did.
    """

    def __init__(self, folder: str | Path):
        import sentencepiece as spm

        self.folder = Path(folder)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.folder / SP_MODEL))
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def _is_special(self, i: int) -> bool:
        return self.sp.is_control(i)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **_: Any) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if not self._is_special(i)])
        text, run = "", []
        for i in ids:
            if self._is_special(i):
                text += self.sp.decode(run) + self.sp.id_to_piece(i)
                run = []
            else:
                run.append(i)
        return text + self.sp.decode(run)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.sp.id_to_piece(ids)
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def save_pretrained(self, dst: str | Path) -> None:
        """Copy the tokenizer files of the source folder into ``dst`` (the same ids when reloaded)."""
        copy_tokenizer_files(self.folder, dst)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every tokenizer file ``src`` has into ``dst``; returns their names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def hub_tokenizer_folder(repo_id: str) -> Path | None:
    """The cached folder holding ``tokenizer.model`` of a hub model, or None where it cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, SP_MODEL)).parent
    except (OSError, ValueError):  # offline, no such file (OSError); not a hub id (ValueError)
        return None


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a model folder or hub id, checked to use OpenLLaMA's ids (bos 1, eos 2).

    A folder with ``tokenizer.model`` gives a ``SentencePieceTokenizer`` (the original's ids);
    anything else goes through ``AutoTokenizer``.
    """
    folder = Path(path) if Path(path).is_dir() else hub_tokenizer_folder(str(path))
    if folder is not None and (folder / SP_MODEL).is_file():
        tokenizer: Any = SentencePieceTokenizer(folder)
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except OSError as err:  # hub id unreachable, or a folder transformers cannot read
            raise ModelPathError(f"{path}: cannot load the tokenizer: {err}") from None
    found = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    if found != {"bos": BOS_ID, "eos": EOS_ID}:
        raise ModelPathError(f"{path}: tokenizer has bos/eos ids {found}, expected bos {BOS_ID}, eos {EOS_ID}")
    return tokenizer
