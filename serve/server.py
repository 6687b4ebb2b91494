"""Serve a model with an OpenAI-compatible API: ``transformers serve`` (a folder) or llama.cpp (a GGUF file),
behind one request check.

    scripts/serve.sh                                   # ./ckpt/openalpaca at http://127.0.0.1:8000/v1
    scripts/serve.sh ./ckpt/demo/openalpaca --port 8001
    scripts/serve.sh ./ckpt/openalpaca-q8_0.gguf       # a .gguf file: llama-cpp-python's server (serve/llamacpp.py)
    scripts/serve.sh MODEL --api_key KEY               # every request needs Authorization: Bearer KEY
    scripts/serve.sh MODEL --host 0.0.0.0              # other machines too: use --api_key, and TLS in front

For a folder, generation, streaming (SSE), ``/v1/models`` and ``/health`` are ``transformers
serve``'s own: the same ``Serve`` object its command line builds, pinned to MODEL
(``--force-model``), so requests are rendered by the folder's chat template and sampled with its
``generation_config.json``. A ``.gguf`` file goes to llama-cpp-python's own server instead, pinned
to the file, with the training ids (see ``serve.llamacpp``).

In front of either app sit the same ASGI layers. ``ChatRequestGuard``: as it comes, ``transformers
serve`` answers an empty ``messages`` list, ``max_tokens: -1`` or a system message (which the
recipe's template refuses) with a bare HTTP 500, and llama-cpp-python silently serves its one
model under any name. The guard reads each ``POST /v1/chat/completions`` first and refuses what the
model must not see with a 4xx and an OpenAI-style ``{"error": {"message": ...}}``: malformed JSON,
an unknown model, empty or malformed messages, out-of-range sampling values, a conversation the
chat template refuses, a prompt (plus ``max_tokens``) longer than the model's context. Each engine
gives it how to count a prompt (its own template and tokenizer) and the sampling to fill in where a
request says nothing. ``ApiKeyGuard`` (``--api_key`` or ``$OPENALPACA_API_KEY``) answers 401 to
any request without ``Authorization: Bearer KEY`` before anything else runs; ``/health`` stays
open. The libraries are never patched; the guards only read requests, and name a folder's model
by the server's name when a request gives another path to the same folder or file.
"""

from __future__ import annotations

import argparse
import functools
import hmac
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.dtypes import CONFIG_DTYPE_NAMES
from model.tokenizer import ModelPathError

DEFAULT_MODEL = "./ckpt/openalpaca"
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
HEALTH_PATH = "/health"
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")
API_KEY_ENV = "OPENALPACA_API_KEY"


class ServeError(ValueError):
    """The model cannot be served as asked; one line, exit 1."""


@dataclass(frozen=True)
class Rejection:
    """A request refused before the model sees it: HTTP status, one-line message, the field at fault."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def payload(self) -> dict[str, Any]:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ----- the checks, one per kind of bad request -----

def parse_body(raw: bytes) -> dict | Rejection:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return Rejection(400, f"the request body is not valid JSON: {err}")
    if not isinstance(body, dict):
        return Rejection(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def same_path(a: str, b: str) -> bool:
    """Two spellings of one local folder or file (``./ckpt/x``, ``ckpt/x``, ``/abs/ckpt/x``)."""
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_model_name(body: dict, served: str) -> Rejection | None:
    """The server is pinned to one model; a request may name it, or another path to its folder or file."""
    requested = body.get("model")
    if requested is None or requested == served:
        return None
    if isinstance(requested, str) and same_path(requested, served):
        body["model"] = served  # the servers compare names as strings
        return None
    return Rejection(404, f"model {requested!r} is not served here; this server serves {served!r} (GET /v1/models)",
                     "model", "model_not_found")


def check_messages(messages: Any) -> Rejection | None:
    """A non-empty list of ``{"role": str, "content": str | [text parts]}`` (what the template reads)."""
    if not isinstance(messages, list) or not messages:
        return Rejection(400, "messages must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return Rejection(400, f"{where} must be an object with a string 'role'", "messages")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                for part in content):
            return Rejection(400, f"{where}.content must be a string or a list of text parts "
                             "({'type': 'text', 'text': ...})", "messages")
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_sampling(body: dict) -> Rejection | None:
    """Values ``generate`` would fail on (a 500 otherwise) or silently misread."""
    for key in TOKEN_LIMITS:
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            return Rejection(400, f"{key} must be a positive integer, got {value!r}", key)
    temperature = body.get("temperature")
    if temperature is not None and not (_number(temperature) and 0 <= temperature <= 2):
        return Rejection(400, f"temperature must be a number from 0 to 2, got {temperature!r}", "temperature")
    top_p = body.get("top_p")
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        return Rejection(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    return None


def prompt_length(tokenizer, messages: list[dict]) -> int | Rejection:
    """The prompt's token count, rendered as transformers serve renders it; a template error is a 400.

    The messages go through the library's own conversion for a text model (content parts joined),
    so the count is the one the model would see.
    """
    from jinja2.exceptions import TemplateError
    from transformers.cli.serving.utils import BaseHandler, Modality

    try:
        ids = tokenizer.apply_chat_template(BaseHandler.get_processor_inputs_from_messages(messages, Modality.LLM),
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    except TemplateError as err:
        return Rejection(400, f"the model's chat template refuses these messages: {err}", "messages")
    return len(ids)


def check_context(n_prompt: int, body: dict, context: int) -> Rejection | None:
    """Prompt and requested new tokens must fit the model's context (``max_position_embeddings``)."""
    if n_prompt >= context:
        return Rejection(400, f"the prompt is {n_prompt} tokens; this model's context is {context} tokens",
                         "messages", "context_length_exceeded")
    limit = next((body[key] for key in TOKEN_LIMITS if body.get(key) is not None), None)
    if limit is not None and n_prompt + limit > context:
        return Rejection(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({limit}) exceed this model's context "
                         f"of {context} tokens", "max_tokens", "context_length_exceeded")
    return None


class RequestChecker:
    """Everything a chat request is checked against: the served name, how the engine counts a prompt
    (``count_prompt(messages)``: its token count, or a Rejection when the chat template refuses the
    messages), the model's context, and the sampling the engine fills in where a request is silent."""

    def __init__(self, served: str, count_prompt: Callable[[list], int | Rejection], context: int,
                 defaults: dict[str, Any] | None = None):
        self.served, self.count_prompt, self.context = served, count_prompt, context
        self.defaults = defaults or {}

    def check(self, raw: bytes) -> dict | Rejection:
        """The request body to forward (the model name possibly normalised), or why it is refused."""
        body = parse_body(raw)
        if isinstance(body, Rejection):
            return body
        rejection = check_model_name(body, self.served) or check_messages(body.get("messages")) or check_sampling(body)
        if rejection:
            return rejection
        n_prompt = self.count_prompt(body["messages"])
        if isinstance(n_prompt, Rejection):
            return n_prompt
        return check_context(n_prompt, body, self.context) or self.fill_defaults(body)

    def fill_defaults(self, body: dict) -> dict:
        """``defaults`` for the keys a request leaves out (or sends as null); a ``max_completion_tokens``
        becomes the ``max_tokens`` an engine reads."""
        if "max_tokens" in self.defaults and body.get("max_tokens") is None:
            body["max_tokens"] = body.get("max_completion_tokens")
        for key, value in self.defaults.items():
            if body.get(key) is None:
                body[key] = value
        return body


# ----- the ASGI layer -----

async def read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes, receive):
    """A ``receive`` that hands the app the (checked) body, then whatever the client sends next."""
    sent = False

    async def _receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return _receive


class ChatRequestGuard:
    """Pure ASGI middleware: chat requests are checked, text completions get the engine's sampling defaults,
    everything else (and streaming) passes untouched."""

    def __init__(self, app, checker: RequestChecker):
        self.app, self.checker = app, checker

    async def __call__(self, scope, receive, send):
        path = scope["path"].rstrip("/") if scope["type"] == "http" and scope["method"] == "POST" else None
        if path == COMPLETIONS_PATH and self.checker.defaults:
            raw = await read_body(receive)
            body = parse_body(raw)  # a bad body goes on as it is: the app answers it
            await self.forward(scope, receive, send, raw if isinstance(body, Rejection) else
                               json.dumps(self.checker.fill_defaults(body)).encode())
            return
        if path != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        result = self.checker.check(await read_body(receive))
        if isinstance(result, Rejection):
            await JSONResponse(result.payload(), status_code=result.status)(scope, receive, send)
            return
        await self.forward(scope, receive, send, json.dumps(result).encode())

    async def forward(self, scope, receive, send, body: bytes):
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await self.app(scope, replay(body, receive), send)


class ApiKeyGuard:
    """Pure ASGI middleware: a request without ``Authorization: Bearer KEY`` (as the openai client sends
    its ``api_key``) gets 401 and an OpenAI-style error, and never reaches the app or the model.
    ``/health`` stays open: it says only that the server is up, and start-up checks poll it."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"].rstrip("/") == HEALTH_PATH:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        print(f"[serve] 401 {scope.get('method', 'WEBSOCKET')} {scope['path']}: no or wrong API key", file=sys.stderr,
              flush=True)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import JSONResponse

        rejection = Rejection(401, "no or wrong API key: send the server's key as Authorization: Bearer KEY "
                              "(the openai client's api_key)", code="invalid_api_key")
        await JSONResponse(rejection.payload(), status_code=401,
                           headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def add_guards(app, checker: RequestChecker, api_key: str | None) -> None:
    """The request check, and outermost (added last) the key check, on a Starlette/FastAPI app."""
    app.add_middleware(ChatRequestGuard, checker=checker)
    if api_key:
        app.add_middleware(ApiKeyGuard, key=api_key)


# ----- what is served -----

def has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def check_servable(model: str) -> None:
    """A local folder needs weights, the exact tokenizer.json and a chat template (every folder the
    project writes has them; a downloaded base model gets them from scripts/exact_tokenizer.sh)."""
    from model.llama import check_model_folder  # transformers: only the folder engine needs it

    try:
        check_model_folder(model)
    except ModelPathError as err:
        raise ServeError(str(err)) from None
    folder = Path(model)
    if folder.is_dir() and not ((folder / "tokenizer.json").is_file() and has_chat_template(folder)):
        raise ServeError(f"{model}: no tokenizer.json or chat template; add them with "
                         f"scripts/exact_tokenizer.sh {model} (--layout clean for the fast recipe)")


def load_checker(model: str) -> RequestChecker:
    """The tokenizer the server will render prompts with, and the model's context."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if not tokenizer.chat_template:
        raise ServeError(f"{model}: the tokenizer has no chat template; download the folder and add one with "
                         "scripts/exact_tokenizer.sh FOLDER")
    context = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None) or tokenizer.model_max_length
    return RequestChecker(model, functools.partial(prompt_length, tokenizer), int(context))


def build_server(model: str, host: str, port: int, dtype: str, device: str, continuous_batching: bool,
                 api_key: str | None = None):
    """``transformers serve``'s server for MODEL with the guards in front; ``.run()`` serves."""
    from transformers.cli.serve import Serve

    class Unstarted(Serve):
        """``Serve`` as its command line builds it, not yet started, so the guard goes in first."""

        def start_server(self):
            pass

    checker = load_checker(model)
    serve = Unstarted(force_model=model, host=host, port=port, dtype=CONFIG_DTYPE_NAMES.get(dtype, dtype),
                      device=device, continuous_batching=continuous_batching, non_blocking=True)
    add_guards(serve.server.config.app, checker, api_key)
    return serve.server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model folder (any the project writes), hub id, or a .gguf file (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api_key", "--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require Authorization: Bearer KEY on every request but /health (default ${API_KEY_ENV})")
    p.add_argument("--dtype", choices=["auto", *CONFIG_DTYPE_NAMES], default="auto",
                   help="weights dtype (default auto: as stored in the folder; folders only)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default auto; folders only)")
    p.add_argument("--continuous_batching", "--continuous-batching", action="store_true",
                   help="transformers serve's continuous batching (paged attention): concurrent requests share steps")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for a .gguf (default: every CPU this process may use)")
    return p.parse_args(argv)


def is_gguf(model: str) -> bool:
    return model.lower().endswith(".gguf")


def check_options(args: argparse.Namespace) -> None:
    """Options of one engine given to the other: refused, not ignored."""
    if is_gguf(args.model):
        given = [name for name, on in (("--dtype", args.dtype != "auto"), ("--device", args.device != "auto"),
                                       ("--continuous_batching", args.continuous_batching)) if on]
        if given:
            raise ServeError(f"{', '.join(given)}: transformers serve's options; a .gguf is served by llama-cpp-python")
    elif args.threads is not None:
        raise ServeError("--threads: for a .gguf file; a folder is served by transformers serve")
    if args.threads is not None and args.threads < 1:
        raise ServeError(f"--threads must be at least 1, got {args.threads}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_options(args)
        if is_gguf(args.model):
            from serve.llamacpp import build_server as build_gguf_server

            server = build_gguf_server(args.model, args.host, args.port, args.threads, args.api_key)
        else:
            check_servable(args.model)
            server = build_server(args.model, args.host, args.port, args.dtype, args.device, args.continuous_batching,
                                  args.api_key)
    except (ServeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    key = ", API key required" if args.api_key else ""
    print(f"serving {args.model} at http://{args.host}:{args.port}/v1 (model name {args.model!r}{key})", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
