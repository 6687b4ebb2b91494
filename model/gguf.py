"""GGUF files for llama.cpp, ollama and LM Studio: the model, the training ids, quantized, with a Modelfile.

    scripts/export_gguf.sh MODEL [--quant q8_0] [--out FILE] [--layout original|clean] [--overwrite]

MODEL is any folder the project writes or reads: the trainer's save path (a DeepSpeed checkpoint,
exported first through ``model.export`` into a temp folder), an HF folder (after
``make_shards.sh`` or ``export_hf.sh``), or a base model folder with ``tokenizer.model`` only.
For each type in ``--quant`` (default ``q8_0``) it writes ``NAME-TYPE.gguf`` next to MODEL (or
``--out``, where ``{type}`` stands for the type) and, beside it, ``NAME-TYPE.Modelfile`` for ollama.

Only llama.cpp's own parts write and quantize: its converter (``convert_hf_to_gguf.py`` and
``gguf-py`` from the llama-cpp-python source release that matches the installed runtime; the
set-up fetches them into the environment, ``converter_dir()``) and its quantizer
(``llama_cpp.llama_model_quantize``). The converter reads a view of MODEL in which the tokenizer
files are the project's (``model.hf_tokenizer``): so every GGUF carries the recipe's chat template
(``tokenizer.chat_template``), bos 1 / eos 2 with ``add_bos_token``, and the sampling of
``generation_config.json`` (``general.sampling.top_k``/``top_p``). Through the converter's own
``GGUFWriter`` two keys of this project are added:

* ``openalpaca.tokenizer.sentencepiece_model`` (uint8 array): the ``tokenizer.model`` bytes. llama.cpp's
  tokenizer has no sentencepiece normaliser (ggml-org/llama.cpp#2023), so on an OpenLLaMA-v1-like
  model it gives other ids than training; the project's GGUF engine (``scripts/serve.sh FILE.gguf``)
  tokenizes with sentencepiece from these bytes (``model.gguf_tokenizer``).
* ``openalpaca.layout``: the prompt layout the chat template renders.

llama.cpp's quantizer copies every key into the quantized file (checked after each file). A model
whose normaliser folds whitespace or maps NFKC gets a one-line warning: plain llama.cpp, ollama and
LM Studio will not see its training ids. Everything is written under temp names and renamed at
the end; bad input is one line (``error: ...``), exit 1, and nothing is written.

``read_metadata`` reads a GGUF's keys with ggml's own GGUF reader (the runtime's ``gguf_*`` C
functions): llama-cpp-python's metadata leaves out arrays, and gguf-py's reader parses a
0.5 MB array element by element (seconds).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from model.hf_tokenizer import LAYOUTS, ollama_template, read_model_proto, write_hf_tokenizer
from model.tokenizer import BOS_ID, EOS_ID, SAMPLING, SP_MODEL, TOKENIZER_FILES, ModelPathError

KEY_SP_MODEL = "openalpaca.tokenizer.sentencepiece_model"
KEY_LAYOUT = "openalpaca.layout"
CONVERTER_ENV = "OPENALPACA_LLAMA_CPP_CONVERTER"  # another converter folder (convert_hf_to_gguf.py, gguf-py)
DEFAULT_TYPES = ("q8_0",)
PLAIN_TYPES = ("f32", "f16", "bf16")  # written by the converter itself
QUANT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1",
               "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")  # llama.cpp's quantizer, from the converter's output
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
ISSUE = "ggml-org/llama.cpp#2023"


class GGUFError(ValueError):
    """The export cannot run as asked; one line naming the file or option."""


# ---------------------------------------------------------------- reading a GGUF (ggml's own reader)

class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


GGUF_SCALARS = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 10: "u64",
                11: "i64", 12: "f64"}
GGUF_CTYPES = {"u8": ctypes.c_uint8, "i8": ctypes.c_int8, "u16": ctypes.c_uint16, "i16": ctypes.c_int16,
               "u32": ctypes.c_uint32, "i32": ctypes.c_int32, "f32": ctypes.c_float, "bool": ctypes.c_bool,
               "u64": ctypes.c_uint64, "i64": ctypes.c_int64, "f64": ctypes.c_double}
GGUF_STRING, GGUF_ARRAY, GGUF_UINT8 = 8, 9, 0


def _ggml_base():
    """ggml's base library as llama-cpp-python ships it (already loaded by ``llama_cpp``)."""
    import llama_cpp

    names = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / names.get(sys.platform, "libggml-base.so")))
    lib.gguf_init_from_file.argtypes, lib.gguf_init_from_file.restype = [ctypes.c_char_p, _InitParams], ctypes.c_void_p
    for name, restype in (("gguf_get_n_kv", ctypes.c_int64), ("gguf_free", None)):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [ctypes.c_void_p], restype
    for name, restype in (("gguf_get_key", ctypes.c_char_p), ("gguf_get_kv_type", ctypes.c_int),
                          ("gguf_get_arr_type", ctypes.c_int), ("gguf_get_arr_n", ctypes.c_size_t),
                          ("gguf_get_arr_data", ctypes.c_void_p), ("gguf_get_val_str", ctypes.c_char_p),
                          *((f"gguf_get_val_{t}", c) for t, c in GGUF_CTYPES.items())):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [ctypes.c_void_p, ctypes.c_int64], restype
    return lib


def read_metadata(path: str | Path) -> dict[str, Any]:
    """A GGUF's keys: numbers, bools, strings, and uint8 arrays as ``bytes`` (other arrays are left out)."""
    lib = _ggml_base()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(no_alloc=True, ctx=None))
    if not ctx:
        raise GGUFError(f"{path}: not a GGUF file (or unreadable)")
    try:
        out: dict[str, Any] = {}
        for i in range(lib.gguf_get_n_kv(ctx)):
            key, kind = lib.gguf_get_key(ctx, i).decode(), lib.gguf_get_kv_type(ctx, i)
            if kind == GGUF_STRING:
                out[key] = lib.gguf_get_val_str(ctx, i).decode("utf-8", errors="replace")
            elif kind in GGUF_SCALARS:
                out[key] = getattr(lib, f"gguf_get_val_{GGUF_SCALARS[kind]}")(ctx, i)
            elif kind == GGUF_ARRAY and lib.gguf_get_arr_type(ctx, i) == GGUF_UINT8:
                out[key] = ctypes.string_at(lib.gguf_get_arr_data(ctx, i), lib.gguf_get_arr_n(ctx, i))
        return out
    finally:
        lib.gguf_free(ctx)


# ---------------------------------------------------------------- llama.cpp's converter

def converter_dir() -> Path:
    """The converter matched to the installed runtime: ``$VENV/share/llama.cpp-converter-VERSION``
    (``scripts/setup.sh`` fetches it from llama-cpp-python's source release), or ``$OPENALPACA_LLAMA_CPP_CONVERTER``."""
    import llama_cpp

    folder = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "share" /
                  f"llama.cpp-converter-{llama_cpp.__version__}")
    if not (folder / "convert_hf_to_gguf.py").is_file() or not (folder / "gguf-py" / "gguf").is_dir():
        raise GGUFError(f"{folder}: llama.cpp's converter (convert_hf_to_gguf.py, gguf-py) is not there; run "
                        "scripts/setup.sh, which fetches it from llama-cpp-python's source release")
    return folder


def _converter():
    """The converter's ``gguf`` and ``conversion`` packages, imported from ``converter_dir()``."""
    folder = converter_dir()
    for path in (str(folder / "gguf-py"), str(folder)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import conversion
    import gguf

    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)  # its per-tensor INFO lines
    for name in ("hf-to-gguf", "gguf.vocab"):
        logging.getLogger(name).addFilter(_known_harmless)
    return gguf, conversion


def _known_harmless(record: logging.LogRecord) -> bool:
    """Two converter warnings every export of these folders gets: transformers 5 writes ``rope_type:
    default`` (plain RoPE), and the exact tokenizer's pair template (two texts) names ``<s>`` as its
    separator; neither changes the file (its keys are checked after writing)."""
    message = record.getMessage()
    return not (message == "Unknown RoPE type: default" or message.startswith("Unknown separator token '<s>'"))


def convert(folder: Path, out_file: Path, outtype: str, layout: str, name: str) -> None:
    """``convert_hf_to_gguf.py FOLDER --outtype OUTTYPE`` through its Python API, with the project's keys."""
    import torch

    gguf, conversion = _converter()
    ftypes = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    hparams = conversion.ModelBase.load_hparams(folder, False)
    try:
        model_class = conversion.get_model_class(
            conversion.get_model_architecture(hparams, conversion.ModelType.TEXT))
    except NotImplementedError as err:
        raise GGUFError(f"{folder / 'config.json'}: llama.cpp's converter does not support this model "
                        f"({err})") from None
    with torch.inference_mode():
        model = model_class(folder, ftypes[outtype], out_file, model_name=name)
        model.gguf_writer.add_array(KEY_SP_MODEL, (folder / SP_MODEL).read_bytes())  # bytes: a uint8 array
        model.gguf_writer.add_string(KEY_LAYOUT, layout)
        model.write()


def quantize(src: Path, dst: Path, qtype: str) -> None:
    """``llama_cpp.llama_model_quantize`` (llama.cpp's quantizer) from ``src`` to ``dst``."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's per-tensor log lines
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise GGUFError(f"{dst}: llama.cpp's quantizer failed ({qtype})")


# ---------------------------------------------------------------- the Modelfile

def sampling() -> dict[str, Any]:
    """The recipe's sampling (``model.tokenizer.SAMPLING``) as ollama's parameters: ollama's defaults differ."""
    return {"top_k": SAMPLING["top_k"], "top_p": SAMPLING["top_p"], "num_predict": SAMPLING["max_new_tokens"],
            "temperature": SAMPLING["temperature"], "repeat_penalty": SAMPLING["repetition_penalty"]}


def modelfile(gguf_name: str, layout: str, context: int | None) -> str:
    """An ollama Modelfile for ``./GGUF_NAME``: the layout's Go template, stop at ``</s>``, the recipe's sampling."""
    params = {**sampling(), **({"num_ctx": context} if context else {})}
    return (
        f"# OpenAlpaca ({layout} layout) for ollama: ollama create NAME -f {Path(gguf_name).stem}.Modelfile\n"
        "# A user message is INSTRUCTION, or INSTRUCTION ### Input: CONTEXT (see docs/local-models.md).\n"
        f"FROM ./{gguf_name}\n"
        f'TEMPLATE """{ollama_template(layout)}"""\n'
        'PARAMETER stop "</s>"\n'
        + "".join(f"PARAMETER {key} {value:g}\n" if isinstance(value, float) else f"PARAMETER {key} {value}\n"
                  for key, value in params.items())
    )


# ---------------------------------------------------------------- export

def normalizer_warning(model_file: Path) -> str | None:
    """One line when llama.cpp's tokenizer cannot give this model's ids (it folds whitespace or maps NFKC)."""
    spec = read_model_proto(model_file).normalizer_spec
    does = [what for what, on in (("folds runs of spaces", spec.remove_extra_whitespaces),
                                  (f"maps text with {spec.name or 'a charsmap'}", bool(spec.precompiled_charsmap)))
            if on]
    if not does:
        return None
    return (f"warning: {model_file}: its sentencepiece normaliser {' and '.join(does)}, which llama.cpp's tokenizer "
            f"does not do ({ISSUE}): plain llama.cpp, ollama and LM Studio give other ids than training for text "
            "with newlines, tabs, runs of spaces or NFKC characters; scripts/serve.sh FILE.gguf gives the training ids")


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def _is_save_path(folder: Path) -> bool:
    return (folder / "latest").is_file() or any(p.is_dir() for p in folder.glob("global_step*"))


def check_source(model: Path) -> None:
    if not model.is_dir():
        raise GGUFError(f"{model}: model folder not found")
    if not (model / "config.json").is_file():
        raise GGUFError(f"{model}: no config.json in the model folder")
    if not (model / SP_MODEL).is_file():
        raise GGUFError(f"{model}: no {SP_MODEL} (the GGUF embeds it so the project's engine gives the training ids)")
    if not (_has_weights(model) or _is_save_path(model)):
        raise GGUFError(f"{model}: no weights (*.safetensors, pytorch_model*.bin) and no DeepSpeed checkpoint "
                        "('latest', global_step*/)")


def source_layout(model: Path) -> str:
    from model.export import trained_layout

    return trained_layout(model)


def base_type(folder: Path) -> str:
    """The converter's output that the quantizer starts from: the weights' own precision (f32 or bf16, nothing
    rounded twice), f16 when config.json does not say."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "f16"
    return {"float32": "f32", "bfloat16": "bf16"}.get(config.get("dtype") or config.get("torch_dtype"), "f16")


GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "top_k", "top_p", "max_new_tokens")


def make_view(src: Path, view: Path, layout: str) -> None:
    """``src`` as the converter should read it: its files linked, the project's tokenizer files written
    (exact tokenizer.json, the layout's chat template), and a ``generation_config.json`` whose missing
    sampling keys are the recipe's (a base model's has none; the trainer's folders have the recipe's)."""
    from model.llama import generation_config

    view.mkdir()
    for path in src.iterdir():
        if path.is_file() and path.name not in (*TOKENIZER_FILES, "generation_config.json"):
            (view / path.name).symlink_to(path.resolve())
    write_hf_tokenizer(src, layout, out_dir=view)
    try:
        config = json.loads((src / "generation_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    recipe = generation_config().to_dict()
    config.update({key: recipe[key] for key in GENERATION_KEYS if config.get(key) is None})
    (view / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def output_paths(model: Path, out: str | None, types: list[str], overwrite: bool) -> dict[str, Path]:
    template = out or str(model.parent / f"{model.name}-{{type}}.gguf")
    if not template.endswith(".gguf"):
        raise GGUFError(f"--out {template}: the file name must end with .gguf")
    if len(types) > 1 and "{type}" not in template:
        raise GGUFError(f"--out {template}: several types need {{type}} in the file name")
    paths = {t: Path(template.replace("{type}", t)) for t in types}
    for path in paths.values():
        for target in (path, path.with_suffix(".Modelfile")):
            if target.exists() and not overwrite:
                raise GGUFError(f"{target}: already exists (pass --overwrite to replace it)")
    return paths


def parse_types(text: str) -> list[str]:
    types = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in PLAIN_TYPES + QUANT_TYPES]
    if not types or unknown:
        raise GGUFError(f"--quant {text}: unknown type {', '.join(unknown) or '(none)'}; choose from "
                        f"{', '.join(PLAIN_TYPES + QUANT_TYPES)}")
    return list(dict.fromkeys(types))


def check_written(path: Path, qtype: str, layout: str, sp_bytes: bytes) -> None:
    """The file has the project's keys, the tokenizer's special ids and the chat template."""
    meta = read_metadata(path)
    found = (meta.get(KEY_SP_MODEL) == sp_bytes, meta.get(KEY_LAYOUT), meta.get("tokenizer.ggml.bos_token_id"),
             meta.get("tokenizer.ggml.eos_token_id"), bool(meta.get("tokenizer.chat_template")))
    if found != (True, layout, BOS_ID, EOS_ID, True):
        raise GGUFError(f"{path}: the {qtype} file lacks the project's keys or special tokens (found {found[1:]}, "
                        f"tokenizer.model embedded: {found[0]})")


def export_gguf(model: str | Path, out: str | None = None, types: list[str] | None = None,
                layout: str | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write one GGUF (and its Modelfile) per type; returns the GGUF paths by type."""
    model = Path(model)
    types = types or list(DEFAULT_TYPES)
    check_source(model)
    layout = layout or source_layout(model)
    if layout not in LAYOUTS:
        raise GGUFError(f"{model}: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    paths = output_paths(model, out, types, overwrite)
    converter_dir()
    if warning := normalizer_warning(model / SP_MODEL):
        print(warning, file=sys.stderr, flush=True)
    sp_bytes = (model / SP_MODEL).read_bytes()
    out_dir = next(iter(paths.values())).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []  # (temp name, final name), renamed together at the end
    work = Path(tempfile.mkdtemp(prefix=".export_gguf-", dir=out_dir))
    try:
        src = model
        if not _has_weights(model):
            from model.export import export

            src = export(model, work / "hf", dtype=None)
        view = work / "view"
        make_view(src, view, layout)
        context = json.loads((view / "config.json").read_text()).get("max_position_embeddings")
        start = base_type(src)
        converted: dict[str, Path] = {}
        for qtype in [t for t in types if t in PLAIN_TYPES] + ([start] if set(types) - set(PLAIN_TYPES) else []):
            if qtype not in converted:
                converted[qtype] = work / f"{uuid.uuid4().hex}.gguf"
                convert(view, converted[qtype], qtype, layout, model.name)
        for qtype in types:
            if qtype in PLAIN_TYPES:
                tmp = converted[qtype]
            else:
                tmp = work / f"{uuid.uuid4().hex}.gguf"
                quantize(converted[start], tmp, qtype)
            check_written(tmp, qtype, layout, sp_bytes)
            staged.append((tmp, paths[qtype]))
            text_tmp = work / f"{uuid.uuid4().hex}.Modelfile"
            text_tmp.write_text(modelfile(paths[qtype].name, layout, context))
            staged.append((text_tmp, paths[qtype].with_suffix(".Modelfile")))
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for qtype, path in paths.items():
        print(f"[export_gguf] wrote {path} ({qtype}, {path.stat().st_size / 2**20:.1f} MiB, layout {layout}) and "
              f"{path.with_suffix('.Modelfile').name}", flush=True)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="export_gguf.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model folder: the trainer's save path, an HF folder, or a base model folder")
    p.add_argument("--quant", default=",".join(DEFAULT_TYPES),
                   help=f"comma-separated types (default {','.join(DEFAULT_TYPES)}): "
                   f"{', '.join(PLAIN_TYPES + QUANT_TYPES)}")
    p.add_argument("--out", default=None,
                   help="output file, NAME.gguf; {type} stands for the type (default: MODEL-{type}.gguf beside MODEL)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="prompt layout of the chat template (default: MODEL's train_config.yaml, else original)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        export_gguf(args.model, args.out, parse_types(args.quant), args.layout, args.overwrite)
    except (GGUFError, ModelPathError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
