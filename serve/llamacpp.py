"""Serve a GGUF with llama-cpp-python's own OpenAI-compatible server, behind the project's request checks.

    scripts/serve.sh ./ckpt/openalpaca-q8_0.gguf [--port 8000] [--threads N] [--api_key KEY]

The app is ``llama_cpp.server.app``'s (chat and text completions, streaming, ``/v1/models``),
pinned to the one file, with the context the file was trained with. Three things are the project's:

* **The training ids.** llama.cpp's tokenizer has no sentencepiece normaliser
  (ggml-org/llama.cpp#2023), so for an OpenLLaMA-v1-like model it would feed the model other ids
  than training. A GGUF written by ``scripts/export_gguf.sh`` carries its ``tokenizer.model``;
  the engine's tokenizer is sentencepiece from those bytes (``model.gguf_tokenizer``), given to the
  ``Llama`` object as its tokenizer, so chat and text completions, prompts and answers, use it.
  The GGUF's chat template renders ``<s>P</s><s>``; llama-cpp-python's chat path tokenizes that
  text without adding a bos of its own and with special tokens parsed, which with this tokenizer
  is exactly training's ``[1, P, 2, 1]``. A GGUF without the bytes falls back to llama.cpp's
  tokenizer, with a warning.
* **The same request checks** as the transformers engine (``serve.server.ChatRequestGuard``: the
  same 4xx answers), counting the prompt with the GGUF's own chat template (rendered by
  llama-cpp-python's ``Jinja2ChatFormatter``, as the app renders it) and the engine's tokenizer, and
  the same ``--api_key`` check.
* **The recipe's sampling where a request says nothing**: top-k and top-p from the file
  (``general.sampling.*``, the model's ``generation_config.json``), 128 new tokens, temperature 1,
  no min-p and no repetition penalty; llama-cpp-python's own defaults are top-k 40, top-p 0.95,
  min-p 0.05, temperature 0.8, repeat penalty 1.1 and 16 tokens, and its repeat penalty would change
  even a greedy answer.

llama-cpp-python's server runs one request at a time (a lock around its one ``Llama``); others
wait their turn. ``interrupt_requests`` is off, so a waiting request never cuts a stream short.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from model.gguf import KEY_LAYOUT, KEY_SP_MODEL, GGUFError, read_metadata
from model.gguf import sampling as recipe_sampling
from serve.server import RequestChecker, ServeError, add_guards


def request_defaults(meta: dict) -> dict:
    """What llama-cpp-python gets where a request is silent: the file's sampling, else the recipe's."""
    recipe = recipe_sampling()
    return {"top_k": int(meta.get("general.sampling.top_k", recipe["top_k"])),
            "top_p": round(float(meta.get("general.sampling.top_p", recipe["top_p"])), 6),
            "temperature": float(meta.get("general.sampling.temp", recipe["temperature"])),
            "min_p": 0.0, "repeat_penalty": float(recipe["repeat_penalty"]), "max_tokens": recipe["num_predict"]}


def training_tokenizer(path: str, meta: dict):
    """sentencepiece from the file's embedded ``tokenizer.model``; None (llama.cpp's tokenizer) without it."""
    if KEY_SP_MODEL not in meta:
        print(f"warning: {path}: no {KEY_SP_MODEL} in the file (not written by scripts/export_gguf.sh): llama.cpp's "
              "own tokenizer is used, which gives other ids than training for models whose normaliser folds "
              "whitespace or maps NFKC (ggml-org/llama.cpp#2023)", file=sys.stderr, flush=True)
        return None
    from model.gguf_tokenizer import SentencePieceGGUFTokenizer

    return SentencePieceGGUFTokenizer(meta[KEY_SP_MODEL], add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)))


def attach_tokenizer(llama, path: str, meta: dict) -> None:
    """Give a loaded ``Llama`` the training tokenizer: what ``Llama(tokenizer=...)`` sets (llama-cpp-python's
    server builds the ``Llama`` itself, so it is set on the object it built)."""
    tokenizer = training_tokenizer(path, meta)
    if tokenizer is not None:
        llama.tokenizer_ = tokenizer


def prompt_counter(llama, template: str):
    """``count(messages)``: the prompt's token count as the engine builds it, or the template's refusal."""
    from jinja2.exceptions import TemplateError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from serve.server import Rejection

    bos, eos = (llama._model.token_get_text(i) for i in (llama.token_bos(), llama.token_eos()))
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)  # as Llama builds it

    def count(messages: list) -> int | Rejection:
        try:
            prompt = formatter(messages=messages).prompt
        except (ValueError, TemplateError) as err:  # the template's raise_exception is a ValueError here
            return Rejection(400, f"the model's chat template refuses these messages: {err}", "messages")
        return len(llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    return count


def build_app(path: str, host: str, port: int, threads: int | None = None, api_key: str | None = None):
    """llama-cpp-python's app for the GGUF at ``path``, its tokenizer the training one, the guards in front."""
    if not Path(path).is_file():
        raise ServeError(f"{path}: no such GGUF file (scripts/export_gguf.sh MODEL writes one)")
    try:
        meta = read_metadata(path)
    except GGUFError as err:
        raise ServeError(str(err)) from None
    template = meta.get("tokenizer.chat_template")
    if not template:
        raise ServeError(f"{path}: the file has no chat template (tokenizer.chat_template); "
                         "export the model with scripts/export_gguf.sh")
    context = int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", 2048))
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    import llama_cpp.server.app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    if meta.get(KEY_LAYOUT) == "original":  # its [1, 1, P, 2, 1] is the recipe's, not a mistake to warn about
        warnings.filterwarnings("ignore", message="Detected duplicate leading", category=RuntimeWarning)
    os.environ.pop("CONFIG_FILE", None)  # llama-cpp-python's server would take its whole set-up from that file
    app = server_app.create_app(
        server_settings=ServerSettings(host=host, port=port, api_key=None, interrupt_requests=False),
        model_settings=[ModelSettings(model=path, model_alias=path, n_ctx=context, n_threads=threads,
                                      n_threads_batch=threads, verbose=False)])
    llama = server_app._llama_proxy()  # the one model, loaded by create_app; the proxy never swaps it
    attach_tokenizer(llama, path, meta)

    async def health() -> dict:
        return {"status": "ok"}

    app.add_api_route("/health", health, methods=["GET"])
    add_guards(app, RequestChecker(path, prompt_counter(llama, template), context, request_defaults(meta)), api_key)
    return app


def build_server(path: str, host: str, port: int, threads: int | None = None, api_key: str | None = None):
    """A uvicorn server for ``build_app``; ``.run()`` serves."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(build_app(path, host, port, threads, api_key), host=host, port=port))
