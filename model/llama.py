"""Load OpenLLaMA (a local HF folder or a hub id) for training and inference.

No device placement here: the DeepSpeed engine places the trained model, and inference
moves the loaded model itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import GenerationConfig, LlamaForCausalLM

from model.dtypes import TORCH_DTYPES
from model.hf_tokenizer import write_hf_tokenizer
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, SAMPLING, SP_MODEL, ModelPathError, load_tokenizer

__all__ = ["TORCH_DTYPES", "ModelPathError", "load_tokenizer", "check_model_folder", "load_model",
           "save_model_metadata"]

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def check_model_folder(path: str | Path, need_weights: bool = True) -> None:
    """Fail early, before any model is built, when a local model folder is incomplete.

    A path that is not a local folder is left to ``from_pretrained`` (a hub id).
    """
    text, path = str(path), Path(path)
    if not path.exists():
        if text.startswith((".", "/", "~")) or text.count("/") != 1:
            raise ModelPathError(f"{text}: model folder not found (see openllama_ckpt/README.md)")
        return  # "owner/name": a hub id, fetched by from_pretrained
    if not path.is_dir():
        raise ModelPathError(f"{path}: expected a model folder, found a file")
    if not (path / "config.json").is_file():
        raise ModelPathError(f"{path}: no config.json in the model folder")
    if not any((path / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise ModelPathError(f"{path}: no tokenizer (tokenizer.model or tokenizer.json) in the model folder")
    if need_weights and not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelPathError(f"{path}: no weights (*.safetensors or pytorch_model*.bin) in the model folder")


def load_model(path: str | Path, dtype: str = "fp32", **kwargs: Any) -> LlamaForCausalLM:
    """``LlamaForCausalLM.from_pretrained`` in ``dtype``.

    Called inside a live ``HfDeepSpeedConfig`` (see ``train_sft.build_engine``) the weights are
    loaded straight into ZeRO-3 partitions, so no rank ever holds the whole model.
    """
    return LlamaForCausalLM.from_pretrained(str(path), dtype=TORCH_DTYPES[dtype], **kwargs)


def generation_config() -> GenerationConfig:
    """Special ids and the original's sampling (top-k 50, top-p 0.9, 128 new tokens): what
    ``generate``, ``transformers serve`` and vLLM use when a request says nothing else."""
    return GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=True,
                            top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"], max_new_tokens=SAMPLING["max_new_tokens"])


def save_model_metadata(model: LlamaForCausalLM, tokenizer: Any, dst: str | Path, layout: str) -> None:
    """Write config.json, generation_config.json and the tokenizer files next to a checkpoint.

    The base model's tokenizer files are copied (``tokenizer.model`` among them: the seed's
    listing has it); where there is a ``tokenizer.model``, the exact ``tokenizer.json`` and the
    chat template of ``layout`` are written over whatever the base folder had
    (``model.hf_tokenizer``), so every tool that loads the folder gets the training ids.
    """
    dst = Path(dst)
    model.config.save_pretrained(dst)
    generation_config().save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    if (dst / SP_MODEL).is_file():
        write_hf_tokenizer(dst, layout)
