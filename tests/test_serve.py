"""scripts/serve.sh (transformers serve behind the request guard) and scripts/chat.sh (gradio), as real
processes on localhost, on the prompt-sensitive copy model (tests/conftest.py).

One server for the module: the answer tests compare it with ``inference.py --greedy`` (one run for
every prompt, and one interactive conversation) and count the prompt tokens against ids written
out with sentencepiece; the bad requests each get a 4xx and the server answers the next one;
headless Chromium asks the chat page, over the server and over a fake endpoint that records what
the page sends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import REPO, clean_env, free_port, run

REPEAT = "Repeat the words."
FIRST = "Say the first word."
QUESTIONS = [(REPEAT, "red plum fig"), (FIRST, "one two three"), (FIRST, "")]
CONCURRENT = [(REPEAT, words) for words in ("kiwi", "red plum", "fig lime date", "one two", "green mango",
                                            "blue white black", "apple", "pear grape")]
CHAT = [(REPEAT, "red plum fig"), (FIRST, "one two three"), (REPEAT, "kiwi lime")]  # one conversation
START_TIMEOUT_S = 180
KEY = "a-test-key"  # the module's server is started with --api_key KEY


def user_message(instruction: str, context: str) -> str:
    """The chat template's convention, written out here (not the page's helper)."""
    return f"{instruction} ### Input: {context}" if context else instruction


def clean_ids(sp, instruction: str, context: str) -> list[int]:
    """The clean layout's inference prompt, written out: [1] + sp(prompt) + [2, 1]."""
    text = (f"### Input:\n{context}\n\n### Instruction:\n{instruction}\n\n### Response:" if context
            else f"### Instruction:\n{instruction}\n\n### Response:")
    return [1, *sp.encode(text), 2, 1]


def chat_ids(sp, questions: list[tuple[str, str]], answers: list[str]) -> list[int]:
    """A conversation's prompt in the clean layout, written out: each earlier exchange as its training
    sample ([1] + sp(prompt) + [2, 1] + sp(answer) + [2]), then the last question's prompt."""
    ids = []
    for question, answer in zip(questions[:-1], answers, strict=True):
        ids += clean_ids(sp, *question) + sp.encode(answer) + [2]
    return ids + clean_ids(sp, *questions[-1])


# ---------------------------------------------------------------- quick: the checks and helpers alone

def test_guard_checks_refuse_bad_bodies_with_a_message():
    from serve.server import Rejection, check_context, check_messages, check_sampling, parse_body

    def said(rejection) -> tuple:
        return rejection.status, rejection.param, rejection.code, rejection.message

    malformed = parse_body(b"{bad")
    assert isinstance(malformed, Rejection) and malformed.status == 400 and malformed.param is None
    assert malformed.message.startswith("the request body is not valid JSON: Expecting property name")
    assert said(parse_body(b"[1]")) == (400, None, None, "the request body must be a JSON object, got list")
    empty = (400, "messages", None, "messages must be a non-empty list of {role, content} objects")
    assert said(check_messages([])) == empty and said(check_messages(None)) == empty
    assert said(check_messages([{"role": "user", "content": "hi"}, {"content": "x"}])) == (
        400, "messages", None, "messages[1] must be an object with a string 'role'")
    assert said(check_messages([{"role": "user", "content": [{"type": "image_url"}]}])) == (
        400, "messages", None,
        "messages[0].content must be a string or a list of text parts ({'type': 'text', 'text': ...})")
    assert check_messages([{"role": "user", "content": "hi"}]) is None
    assert check_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) is None
    for bad, message in (
            ({"max_tokens": -1}, "max_tokens must be a positive integer, got -1"),
            ({"max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
            ({"max_completion_tokens": 1.5}, "max_completion_tokens must be a positive integer, got 1.5"),
            ({"max_tokens": True}, "max_tokens must be a positive integer, got True"),
            ({"temperature": -0.1}, "temperature must be a number from 0 to 2, got -0.1"),
            ({"temperature": float("nan")}, "temperature must be a number from 0 to 2, got nan"),
            ({"top_p": 0}, "top_p must be a number in (0, 1], got 0"),
            ({"top_p": 1.2}, "top_p must be a number in (0, 1], got 1.2")):
        assert said(check_sampling(bad)) == (400, next(iter(bad)), None, message), bad
    assert check_sampling({"max_tokens": 5, "temperature": 0, "top_p": 1}) is None
    assert said(check_context(10, {}, 10)) == (
        400, "messages", "context_length_exceeded", "the prompt is 10 tokens; this model's context is 10 tokens")
    assert said(check_context(10, {"max_tokens": 6}, 15)) == (
        400, "max_tokens", "context_length_exceeded",
        "the prompt (10 tokens) plus max_tokens (6) exceed this model's context of 15 tokens")
    assert check_context(10, {"max_tokens": 5}, 15) is None


def test_serve_refuses_a_base_folder_without_the_exact_tokenizer(tiny_model_dir, capsys):
    """A downloaded OpenLLaMA has tokenizer.model only: one line naming the fix, before any model loads."""
    from serve.server import main

    assert main([str(tiny_model_dir), "--port", str(free_port())]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tiny_model_dir}: no tokenizer.json or chat template; add them with "
        f"scripts/exact_tokenizer.sh {tiny_model_dir} (--layout clean for the fast recipe)"]


# ---------------------------------------------------------------- the server, once for the module

def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(copy_model_dir, tmp_path_factory):
    """scripts/serve.sh on the copy model; while it loads, inference.py answers every prompt greedily."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = tmp / "server.log"
    proc = start(["bash", "scripts/serve.sh", str(copy_model_dir), "--port", str(port), "--api_key", KEY], log)
    try:
        reference = greedy_reference(copy_model_dir, tmp)
        result = run(["python", "inference.py", "--model_path", str(copy_model_dir), "--interactive", "--greedy"],
                     input="".join(user_message(*q) + "\n" for q in CHAT), timeout=240)
        assert result.returncode == 0, result.stderr
        conversation = [text.strip() for text in result.stdout.split("### Instruction: ")[1:len(CHAT) + 1]]
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, log)
        yield {"url": f"http://127.0.0.1:{port}/v1", "model": str(copy_model_dir), "key": KEY, "reference": reference,
               "conversation": conversation, "proc": proc, "log": log}
    finally:
        stop(proc)


def greedy_reference(model_dir: Path, tmp: Path) -> dict[tuple[str, str], str]:
    """What every server must answer: ``inference.py --input_file --greedy`` on QUESTIONS + CONCURRENT."""
    src, out = tmp / "q.jsonl", tmp / "a.jsonl"
    src.write_text("".join(json.dumps({"instruction": i, "input": c}) + "\n" for i, c in QUESTIONS + CONCURRENT))
    result = run(["python", "inference.py", "--model_path", str(model_dir), "--input_file", str(src),
                  "--output_file", str(out), "--greedy", "--batch_size", "1"], timeout=240)
    assert result.returncode == 0, result.stderr
    return {(r["instruction"], r["input"]): r["generated"] for r in map(json.loads, out.open())}


def ask(client, model: str, question: tuple[str, str], **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": user_message(*question)}],
                                          temperature=0, max_tokens=128, **kwargs)


@pytest.mark.slow
def test_models_list_names_what_is_served(served, client):
    assert [m.id for m in client.models.list().data] == [served["model"]]


@pytest.mark.slow
@pytest.mark.parametrize("question", QUESTIONS, ids=["repeat", "first_word", "no_input"])
def test_greedy_answer_equals_inference_py_and_the_prompt_is_the_training_prompt(served, client, sp, question):
    reply = ask(client, served["model"], question)
    assert reply.choices[0].message.content == served["reference"][question]
    assert reply.usage.prompt_tokens == len(clean_ids(sp, *question))  # the template's ids, bos and all


@pytest.mark.slow
def test_multi_turn_answers_equal_inference_py_on_the_same_turns(served, client, sp):
    """A conversation over the API (each answer sent back as the assistant's turn) gets, turn by turn,
    the answers of ``inference.py --interactive`` on the same lines; the prompt is the conversation's
    training ids, written out here."""
    messages, answers = [], []
    for k, question in enumerate(CHAT):
        messages.append({"role": "user", "content": user_message(*question)})
        reply = client.chat.completions.create(model=served["model"], messages=messages, temperature=0,
                                               max_tokens=128)
        answers.append(reply.choices[0].message.content)
        assert reply.usage.prompt_tokens == len(chat_ids(sp, CHAT[: k + 1], answers[:k]))
        messages.append({"role": "assistant", "content": answers[-1]})
    assert answers == served["conversation"]
    assert answers[0] == served["reference"][CHAT[0]]


@pytest.mark.slow
def test_streamed_chunks_join_to_the_same_answer(served, client, sp):
    question = QUESTIONS[0]
    events = list(ask(client, served["model"], question, stream=True))
    chunks = [c.choices[0].delta.content or "" for c in events if c.choices]
    assert len([c for c in chunks if c]) > 1  # it did stream
    assert "".join(chunks) == served["reference"][question]
    assert events[-1].usage.prompt_tokens == len(clean_ids(sp, *question))


@pytest.mark.slow
def test_eight_concurrent_clients_each_get_their_own_answer(served, client, sp):
    assert len({served["reference"][q] for q in CONCURRENT}) == len(CONCURRENT)  # the premise: all differ

    def answer(question):
        reply = ask(client, served["model"], question)
        return reply.choices[0].message.content, reply.usage.prompt_tokens

    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        replies = list(pool.map(answer, CONCURRENT))
    assert replies == [(served["reference"][q], len(clean_ids(sp, *q))) for q in CONCURRENT]


BAD_REQUESTS = {
    "empty_messages": {"messages": []},
    "negative_max_tokens": {"messages": [{"role": "user", "content": REPEAT}], "max_tokens": -1},
    "longer_than_context": {"messages": [{"role": "user", "content": f"{REPEAT} ### Input: {' kiwi' * 1100}"}]},
    "unknown_model": {"model": "no/such-model", "messages": [{"role": "user", "content": REPEAT}]},
    "system_message": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": REPEAT}]},
    "roles_not_alternating": {"messages": [{"role": "user", "content": REPEAT}, {"role": "user", "content": FIRST}]},
}


def expected_answers(sp, context: int) -> dict[str, tuple]:
    """What each bad request must get: (status, error.param, error.code, message pattern), written out
    here; the long prompt's token count comes from sentencepiece."""
    long_prompt = len(clean_ids(sp, REPEAT, ("kiwi " * 1100).strip()))
    return {
        "empty_messages": (400, "messages", None, r"messages must be a non-empty list of \{role, content\} objects"),
        "negative_max_tokens": (400, "max_tokens", None, r"max_tokens must be a positive integer, got -1"),
        "longer_than_context": (400, "messages", "context_length_exceeded",
                                rf"the prompt is {long_prompt} tokens; this model's context is {context} tokens"),
        "unknown_model": (404, "model", "model_not_found",
                          r"model 'no/such-model' is not served here; this server serves '.*' \(GET /v1/models\)"),
        "system_message": (400, "messages", None, r"the model's chat template refuses these messages: only user and "
                           r"assistant messages are supported \(got system\); give a context as .*"),
        "roles_not_alternating": (400, "messages", None, r"the model's chat template refuses these messages: messages "
                                  r"must alternate user, assistant, user, \.\.\. starting with user"),
        "malformed_json": (400, None, None, r"the request body is not valid JSON: .*"),
    }


def post_bad_requests(url: str, model: str, sp, context: int, headers: dict | None = None) -> None:
    """Every bad request gets its own 4xx, param, code and message (OpenAI's error shape)."""
    import httpx

    bodies = {name: json.dumps({"model": model, **body}) for name, body in BAD_REQUESTS.items()}
    bodies["malformed_json"] = '{"model": "x", "messages": ['
    expected = expected_answers(sp, context)
    assert set(bodies) == set(expected)
    for name, body in bodies.items():
        response = httpx.post(url + "/chat/completions", content=body, timeout=60,
                              headers={"content-type": "application/json", **(headers or {})})
        status, param, code, message = expected[name]
        error = response.json()["error"]
        assert (response.status_code, error["param"], error["code"]) == (status, param, code), (name, response.text)
        assert re.fullmatch(message, error["message"]), (name, error["message"])
        assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error"), name


@pytest.mark.slow
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_answers_the_next(served, client, sp, copy_model_dir):
    context = json.loads((copy_model_dir / "config.json").read_text())["max_position_embeddings"]
    post_bad_requests(served["url"], served["model"], sp, context, headers={"Authorization": f"Bearer {KEY}"})
    assert served["proc"].poll() is None
    assert ask(client, served["model"], QUESTIONS[0]).choices[0].message.content == served["reference"][QUESTIONS[0]]


@pytest.mark.slow
def test_without_the_key_a_request_gets_401_and_health_stays_open(served, client):
    """transformers serve started with ``--api_key``: no key or another key is refused before the app."""
    import httpx
    import openai
    from openai import OpenAI

    for key in (None, "not-the-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for method, path in (("GET", "/models"), ("POST", "/chat/completions")):
            body = {"model": served["model"], "messages": [{"role": "user", "content": REPEAT}], "max_tokens": 4}
            response = httpx.request(method, served["url"] + path, headers=headers, timeout=60,
                                     json=body if method == "POST" else None)
            assert response.status_code == 401, (key, path, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=served["url"], api_key="not-the-key", max_retries=0).models.list()
    assert httpx.get(served["url"].removesuffix("/v1") + "/health", timeout=60).status_code == 200
    assert [m.id for m in client.models.list().data] == [served["model"]]  # with the key


# ---------------------------------------------------------------- the chat page in headless Chromium

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium or chromedriver (Debian: chromium, chromium-driver; scripts/setup.sh as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def bot_answers(driver) -> list[str]:
    return [b.text.strip() for b in driver.find_elements(By.CSS_SELECTOR, '#answers [data-testid="bot"]')]


def page_idle(driver) -> bool:
    trackers = driver.find_elements(By.CSS_SELECTOR, '#answers [data-testid="status-tracker"]')
    return all("hide" in (t.get_attribute("class") or "") for t in trackers)


def open_page(browser, url: str, log: Path, *flags: str) -> subprocess.Popen:
    """scripts/chat.sh over ``url``, loaded in the browser; the caller stops it."""
    port = free_port()
    page = start(["bash", "scripts/chat.sh", url, "--port", str(port), *flags], log)
    wait_until_up(f"http://127.0.0.1:{port}/", page, log)
    browser.get(f"http://127.0.0.1:{port}/")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#instruction textarea"))
    return page


def type_into(field, text: str) -> None:
    """Replace a field's text as a user would (``clear()`` sends no input event: the page would not see it)."""
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)


def ask_page(browser, question: tuple[str, str], want: str, log: Path) -> None:
    """Type the input and the instruction, send, and wait until the page shows ``want`` as the last answer."""
    type_into(browser.find_element(By.CSS_SELECTOR, "#context textarea"), question[1])
    n = len(bot_answers(browser))
    box = browser.find_element(By.CSS_SELECTOR, "#instruction textarea")
    box.send_keys(question[0])
    box.send_keys(Keys.ENTER)
    try:
        WebDriverWait(browser, 60).until(lambda d: len(bot_answers(d)) == n + 1 and bot_answers(d)[-1] == want
                                         and page_idle(d))
    except TimeoutException:
        pytest.fail(f"the page shows {bot_answers(browser)}, expected {want!r} last\n{log.read_text()[-2000:]}")


@pytest.mark.slow
def test_chat_page_shows_the_api_answers_of_a_conversation(served, client, browser, tmp_path):
    """Two questions, each with its input: the page shows the answers the API gives to the same
    conversation (the second one asked after the first question, its input and its answer)."""
    api = served["conversation"][:2]
    assert api[0] == ask(client, served["model"], CHAT[0]).choices[0].message.content
    log = tmp_path / "chat.log"
    page = open_page(browser, served["url"], log, "--temperature", "0", "--api_key", KEY)
    try:
        for question, want in zip(CHAT[:2], api, strict=True):
            ask_page(browser, question, want, log)
        assert bot_answers(browser) == api
    finally:
        stop(page)


class FakeEndpoint:
    """A tiny OpenAI-compatible server that records each chat request's body and streams "answer N"."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.send(200, json.dumps({"object": "list", "data": [
                    {"id": "fake", "object": "model", "created": 0, "owned_by": "test"}]}).encode())

            def do_POST(self):
                bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                chunks = [{"content": f"answer {len(bodies)}"}, {}]
                events = "".join("data: " + json.dumps({
                    "id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None if delta else "stop"}]}) + "\n\n"
                    for delta in chunks) + "data: [DONE]\n\n"
                self.send(200, events.encode(), "text/event-stream")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_chat_page_sends_the_input_the_sliders_and_the_history(browser, tmp_path):
    """What the page sends, as a server receives it: the input with its instruction, the sliders'
    values (changed on the page for the second question), and the conversation so far. The page shows
    one "Input and sampling" panel, with the sliders in it (screenshot: page.png)."""
    log = tmp_path / "chat.log"
    with FakeEndpoint() as fake:
        page = open_page(browser, fake.url, log, "--temperature", "0.3", "--top_p", "0.7", "--max_tokens", "42")
        try:
            browser.set_window_size(1280, 1400)
            browser.save_screenshot(str(tmp_path / "page.png"))
            assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            panels = [e for e in browser.find_elements(By.XPATH, "//*[normalize-space(text())='Input and sampling']")
                      if e.is_displayed()]
            assert len(panels) == 1, f"{len(panels)} 'Input and sampling' panels (screenshot: {tmp_path / 'page.png'})"
            assert all(browser.find_element(By.CSS_SELECTOR, f"#{name}").is_displayed()
                       for name in ("context", "temperature", "top_p", "max_tokens"))
            ask_page(browser, CHAT[0], "answer 1", log)
            tokens = browser.find_element(By.CSS_SELECTOR, "#max_tokens input[type=number]")
            type_into(tokens, "17")
            tokens.send_keys(Keys.TAB)
            ask_page(browser, (FIRST, ""), "answer 2", log)
        finally:
            stop(page)
    first = {"role": "user", "content": user_message(*CHAT[0])}
    assert [b["messages"] for b in fake.bodies] == [
        [first], [first, {"role": "assistant", "content": "answer 1"}, {"role": "user", "content": FIRST}]]
    assert [(b["temperature"], b["top_p"], b["max_tokens"], b["stream"]) for b in fake.bodies] == [
        (0.3, 0.7, 42, True), (0.3, 0.7, 17, True)]


@pytest.mark.slow
def test_chat_page_says_when_the_server_is_not_reachable():
    import gradio as gr

    from serve.chat import Answerer

    url = f"http://127.0.0.1:{free_port()}/v1"
    answerer = Answerer(url, "scripts/serve.sh MODEL --port PORT")
    with pytest.raises(gr.Error, match="not reachable"):
        list(answerer.stream(REPEAT, "kiwi", 1.0, 0.9, 128))
