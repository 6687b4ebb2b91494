"""A web chat page for a served model: gradio over any OpenAI-compatible endpoint.

    scripts/chat.sh                                  # talks to http://127.0.0.1:8000/v1 (scripts/serve.sh)
    scripts/chat.sh http://gpu-box:8000/v1           # any OpenAI-compatible server (vllm serve FOLDER too)
    scripts/chat.sh ./ckpt/openalpaca                # starts scripts/serve.sh for the folder, then the page
    scripts/chat.sh URL --api_key KEY                # a server started with --api_key (or $OPENALPACA_API_KEY)

The page is at http://127.0.0.1:7860 (``--host``/``--port``). Answers stream in. It is a
conversation: each question is sent with the conversation so far (its questions, each with the
input it was asked with, and the answers shown), which the model folder's chat template renders as
the model was trained on conversations (docs/conversations.md); clearing the chat starts a new one.
The optional input goes in the same user message as ``INSTRUCTION ### Input: CONTEXT`` (the chat
template's convention). Sampling defaults are the original's: temperature 1, top-p 0.9, 128 new
tokens, and top-k 50, which the server applies (from the model folder's ``generation_config.json``,
or the GGUF's sampling keys; temperature 0 is greedy). When the server cannot be reached the page
says so, with the command that starts one.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local page

DEFAULT_URL = "http://127.0.0.1:8000/v1"
INPUT_MARK = "### Input:"  # model.hf_tokenizer.INPUT_MARK, the chat template's convention
REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 900  # loading a 7B folder from a slow disk


class ChatError(ValueError):
    """The page cannot start as asked; one line, exit 1."""


def user_message(instruction: str, context: str) -> str:
    """One user message for the chat template: the instruction, then the optional input.

    >>> user_message("Summarise the text.", "  Alpacas are camelids. ")
    'Summarise the text. ### Input: Alpacas are camelids.'
    >>> user_message("Name a fruit.", "")
    'Name a fruit.'
    """
    instruction, context = instruction.strip(), context.strip()
    return f"{instruction} {INPUT_MARK} {context}" if context else instruction


def message_text(content) -> str:
    """The text of a chat message's content: a string, or gradio's list of text parts.

    >>> message_text("red fig"), message_text([{"type": "text", "text": "red "}, {"type": "text", "text": "fig"}])
    ('red fig', 'red fig')
    """
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def conversation(history: list[dict], sent: list[list[str]], instruction: str,
                 context: str) -> tuple[list[dict], list[list[str]]]:
    """The OpenAI ``messages`` for a question asked after the page's ``history``, and the new record
    of what was sent.

    The page shows a question as typed; ``sent`` holds ``[shown, sent]`` for each earlier question,
    so a question asked with an input goes back with it. An entry that no longer matches the
    history (the chat was cleared, a turn undone or retried) is dropped, and that question goes
    back as shown.

    >>> history = [{"role": "user", "content": [{"type": "text", "text": "Sort."}]},
    ...            {"role": "assistant", "content": [{"type": "text", "text": "a b"}]}]
    >>> messages, sent = conversation(history, [["Sort.", "Sort. ### Input: b a"]], "Upper case.", "")
    >>> [m["content"] for m in messages]
    ['Sort. ### Input: b a', 'a b', 'Upper case.']
    >>> sent
    [['Sort.', 'Sort. ### Input: b a'], ['Upper case.', 'Upper case.']]
    >>> [m["content"] for m in conversation([], [["Sort.", "Sort. ### Input: b a"]], "Hi.", "")[0]]
    ['Hi.']
    """
    messages, kept = [], []
    for turn in history:
        text = message_text(turn.get("content", ""))
        if turn.get("role") == "user":
            n = len(kept)
            full = sent[n][1] if n < len(sent) and sent[n][0] == text else text
            kept.append([text, full])
            messages.append({"role": "user", "content": full})
        elif turn.get("role") == "assistant":
            messages.append({"role": "assistant", "content": text})
    question = user_message(instruction, context)
    return [*messages, {"role": "user", "content": question}], [*kept, [instruction, question]]


def api_url(target: str) -> str:
    """An OpenAI base URL from what a user types (``http://host:8000`` or ``.../v1``).

    >>> api_url("http://127.0.0.1:8000"), api_url("http://127.0.0.1:8000/v1/")
    ('http://127.0.0.1:8000/v1', 'http://127.0.0.1:8000/v1')
    """
    target = target.rstrip("/")
    return target if target.endswith("/v1") else target + "/v1"


class Answerer:
    """Streams answers from the endpoint; the model is whatever the server lists first."""

    def __init__(self, base_url: str, start_hint: str, api_key: str | None = None):
        from openai import OpenAI

        self.base_url, self.start_hint = base_url, start_hint
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"),
                             max_retries=0)
        self.model: str | None = None

    def model_name(self) -> str:
        if self.model is None:
            self.model = self.client.models.list().data[0].id
        return self.model

    def stream(self, instruction: str, context: str, temperature: float, top_p: float,
               max_tokens: int, history: list[dict] | None = None) -> Iterator[str]:
        """The answer so far, after each streamed chunk; a gradio error the page shows otherwise.

        ``history``: the OpenAI messages of the conversation so far, sent before the question.
        """
        import gradio as gr
        import openai

        if not instruction.strip():
            raise gr.Error("Type an instruction first.")
        messages = [*(history or []), {"role": "user", "content": user_message(instruction, context)}]
        try:
            chunks = self.client.chat.completions.create(
                model=self.model_name(), messages=messages,
                temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens), stream=True)
            text = ""
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                    yield text
        except openai.APIConnectionError:
            raise gr.Error(f"The model server at {self.base_url} is not reachable. Start one with: "
                           f"{self.start_hint}", duration=None) from None
        except openai.APIStatusError as err:
            raise gr.Error(f"The server refused the request ({err.status_code}): {error_message(err)}") from None


def error_message(err) -> str:
    body = err.body if isinstance(err.body, dict) else {}
    inner = body.get("error", body)
    return (inner.get("message") or inner.get("detail")) if isinstance(inner, dict) else str(err)


def build_page(answerer: Answerer, temperature: float, top_p: float, max_tokens: int):
    import gradio as gr

    def answer(message: str, history: list, context: str, temperature: float, top_p: float, max_tokens: int,
               sent: list | None):
        messages, sent = conversation(history, sent or [], message, context)
        for text in answerer.stream(message, context, temperature, top_p, max_tokens, history=messages[:-1]):
            yield text, sent

    extra = [
        gr.Textbox(label="Input (optional)", lines=3, elem_id="context", render=False,
                   placeholder="a context for the instruction, e.g. the text to summarise"),
        gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature (0: greedy)", elem_id="temperature",
                  render=False),
        gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="Top-p", elem_id="top_p", render=False),
        gr.Slider(1, 1024, value=max_tokens, step=1, label="Max new tokens", elem_id="max_tokens", render=False),
    ]
    with gr.Blocks(title="OpenAlpaca", analytics_enabled=False) as page:
        gr.Markdown(f"## OpenAlpaca\nServer: `{answerer.base_url}`. Each question is sent with the conversation "
                    "so far; clear the chat to start a new one. Top-k 50 is the server's default (the model folder's "
                    "generation_config.json, or the GGUF's sampling keys).")
        sent = gr.State([])  # [shown, sent] of each question of the conversation (its input with it)
        # The accordion is named, not built here: a gr.Accordion made inside the Blocks would be rendered
        # where it is made (an empty panel) and again by ChatInterface around the inputs.
        gr.ChatInterface(answer, additional_inputs=[*extra, sent], additional_outputs=[sent],
                         additional_inputs_accordion="Input and sampling",
                         chatbot=gr.Chatbot(elem_id="answers", height=360),
                         textbox=gr.Textbox(elem_id="instruction", placeholder="an instruction", submit_btn=True))
    return page


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll the server's /health until it answers, or fail when its process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ChatError(f"scripts/serve.sh exited with status {proc.returncode} (its messages are above)")
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise ChatError(f"the server did not answer at {url} within {timeout:.0f}s")


def start_server(model: str, port: int, api_key: str | None = None) -> tuple[subprocess.Popen, str]:
    """``scripts/serve.sh MODEL`` as a child process, for ``chat.sh MODEL``."""
    url = f"http://127.0.0.1:{port}/v1"
    key = ["--api_key", api_key] if api_key else []
    proc = subprocess.Popen([str(REPO / "scripts" / "serve.sh"), model, "--port", str(port), *key])
    try:
        wait_for_server(url, proc, SERVER_START_TIMEOUT_S)
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    return proc, url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chat.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", default=DEFAULT_URL,
                   help=f"an OpenAI-compatible URL (default {DEFAULT_URL}), or a model folder to serve first")
    p.add_argument("--host", default="127.0.0.1", help="address the page binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    p.add_argument("--server_port", type=int, default=8000, help="port of the server started for a model folder")
    p.add_argument("--temperature", type=float, default=1.0, help="the page's default temperature (0: greedy)")
    p.add_argument("--top_p", type=float, default=0.9, help="the page's default top-p")
    p.add_argument("--max_tokens", type=int, default=128, help="the page's default number of new tokens")
    p.add_argument("--api_key", "--api-key", default=os.environ.get("OPENALPACA_API_KEY") or None,
                   help="the server's API key (default $OPENALPACA_API_KEY, else $OPENAI_API_KEY); a server this "
                   "page starts requires it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    try:
        if args.target.startswith(("http://", "https://")):
            url, hint = api_url(args.target), "scripts/serve.sh MODEL --port PORT"
        else:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so `finally` stops the server it started
            server, url = start_server(args.target, args.server_port, args.api_key)
            hint = f"scripts/chat.sh {args.target}"
        page = build_page(Answerer(url, hint, args.api_key), args.temperature, args.top_p, args.max_tokens)
        print(f"chat page for {url} at http://{args.host}:{args.port}", flush=True)
        page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, show_error=True)
    except ChatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
