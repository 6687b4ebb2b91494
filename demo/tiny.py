"""A tiny sentencepiece tokenizer and a tiny random-init LLaMA, written as an HF folder.

They stand in for OpenLLaMA-7B in the tests, the CPU demo and the benchmarks: the folder has
the same files as ``openllama_ckpt/`` (config.json, generation_config.json, weights,
tokenizer.model, tokenizer_config.json, special_tokens_map.json) and the same special ids.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from openalpaca.prompts import BOS_ID, EOS_ID, PAD_ID, PROMPT_NO_INPUT, PROMPT_WITH_INPUT

# OpenLLaMA's tokenizer_config.json, minus the fields older transformers needed.
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "model_max_length": 2048,
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a sentencepiece BPE model (unk 0, bos 1, eos 2, as LLaMA) and write it to ``out_dir``.

    BPE, not unigram, because transformers 5.x converts only BPE models faithfully. Identity
    normalisation keeps newlines, so the prompt template survives a round trip. The prompt
    templates are always part of the corpus. ``vocab_size`` is an upper bound: a small corpus
    yields fewer pieces.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = [PROMPT_NO_INPUT, PROMPT_WITH_INPUT, *texts]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=proto,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        max_sentence_length=1 << 16,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(proto.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    return out_dir / "tokenizer.model"


def tokenizer_vocab_size(out_dir: str | Path) -> int:
    return spm.SentencePieceProcessor(model_file=str(Path(out_dir) / "tokenizer.model")).get_piece_size()


def llama_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )


def write_tiny_llama(out_dir: str | Path, config: LlamaConfig, seed: int = 0) -> Path:
    """Write a random-init LLaMA with ``config`` into ``out_dir`` (next to its tokenizer files)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_checkpoint(
    out_dir: str | Path, texts: Iterable[str], vocab_size: int = 512, seed: int = 0, **shape
) -> Path:
    """Tokenizer + random LLaMA in one folder, shaped like ``openllama_ckpt/``."""
    train_tokenizer(texts, out_dir, vocab_size)
    return write_tiny_llama(out_dir, llama_config(tokenizer_vocab_size(out_dir), **shape), seed=seed)
