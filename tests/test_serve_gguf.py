"""scripts/serve.sh MODEL.gguf (serve/llamacpp.py): llama-cpp-python's server, the training ids, the same guard.

One server for the module, on the prompt-sensitive copy model (tests/conftest.py) exported to an
f32 GGUF, started with ``--api_key``: its greedy answers equal ``inference.py --greedy`` (run once
for every prompt while the server loads), its prompt counts are the ids written out with
sentencepiece, the bad requests get the transformers engine's 4xx answers (status, param, code and
message each), and a request without the key gets 401 and never reaches the app.
"""

from __future__ import annotations

import json

import pytest

from tests import test_serve
from tests.conftest import free_port
from tests.test_serve import (
    BAD_REQUESTS,
    FIRST,
    QUESTIONS,
    REPEAT,
    ask,
    clean_ids,
    greedy_reference,
    start,
    stop,
    wait_until_up,
)

# The tests every engine passes, collected here too: they run against this module's ``served`` (the
# GGUF). llama-cpp-python answers concurrent clients one at a time; the others wait, none is cut
# short or mixed up.
test_models_list_names_what_is_served = test_serve.test_models_list_names_what_is_served
test_greedy_answer_equals_inference_py_and_the_prompt_is_the_training_prompt = (
    test_serve.test_greedy_answer_equals_inference_py_and_the_prompt_is_the_training_prompt)
test_eight_concurrent_clients_each_get_their_own_answer = (
    test_serve.test_eight_concurrent_clients_each_get_their_own_answer)

KEY = "sk-local-test-key"


# ---------------------------------------------------------------- quick: the layers alone

def test_api_key_guard_answers_401_before_the_app():
    """Without the key, or with another, a request gets OpenAI's 401 shape and the app never runs; /health is open."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serve.server import ApiKeyGuard

    reached = []

    async def endpoint(request):
        reached.append(request.url.path)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"]),
                            Route("/health", endpoint), Route("/v1/models", endpoint)])
    app.add_middleware(ApiKeyGuard, key=KEY)
    client = TestClient(app)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            response = client.request(method, path, headers=headers, json={"messages": []})
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert response.json() == {"error": {
                "message": "no or wrong API key: send the server's key as Authorization: Bearer KEY (the openai "
                           "client's api_key)", "type": "invalid_request_error", "param": None,
                "code": "invalid_api_key"}}
    assert reached == []
    assert client.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={}).status_code == 200
    assert reached == ["/health", "/v1/chat/completions"]


def test_the_engine_fills_the_recipes_sampling_where_a_request_is_silent():
    from serve.llamacpp import request_defaults
    from serve.server import RequestChecker

    defaults = request_defaults({"general.sampling.top_k": 50, "general.sampling.top_p": 0.8999999761581421})
    assert defaults == {"top_k": 50, "top_p": 0.9, "temperature": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
                        "max_tokens": 128}
    checker = RequestChecker("m", lambda messages: 3, 1024, defaults)
    assert checker.fill_defaults({"top_k": 5, "top_p": None, "max_completion_tokens": 7}) == {
        **defaults, "top_k": 5, "max_tokens": 7, "max_completion_tokens": 7}


def test_serve_sh_passes_the_key_to_either_engine_and_refuses_the_others_options(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    import serve.llamacpp
    import serve.server

    built = []

    class Server:
        def run(self):
            pass

    monkeypatch.setattr(serve.server, "build_server", lambda model, *args: built.append((model, args[-1])) or Server())
    monkeypatch.setattr(serve.llamacpp, "build_server", lambda path, *args: built.append((path, args[-1])) or Server())
    monkeypatch.setattr(serve.server, "check_servable", lambda model: None)
    gguf = str(tmp_path / "m.gguf")
    assert serve.server.main([str(tiny_model_dir), "--api_key", KEY]) == 0
    monkeypatch.setenv("OPENALPACA_API_KEY", "from-env")
    assert serve.server.main([gguf]) == 0
    assert built == [(str(tiny_model_dir), KEY), (gguf, "from-env")]
    capsys.readouterr()
    assert serve.server.main([gguf, "--continuous_batching"]) == 1
    assert serve.server.main([str(tiny_model_dir), "--threads", "2"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: --continuous_batching: transformers serve's options; a .gguf is served by llama-cpp-python",
        "error: --threads: for a .gguf file; a folder is served by transformers serve"]


# ---------------------------------------------------------------- the server, once for the module

@pytest.fixture(scope="module")
def gguf_file(copy_model_dir, tmp_path_factory):
    from model.gguf import export_gguf

    return export_gguf(copy_model_dir, out=str(tmp_path_factory.mktemp("gguf") / "copy.gguf"), types=["f32"])["f32"]


@pytest.fixture(scope="module")
def served(gguf_file, copy_model_dir, tmp_path_factory):
    """scripts/serve.sh on the GGUF, with an API key; while it loads, inference.py answers every prompt greedily."""
    tmp = tmp_path_factory.mktemp("serve_gguf")
    port = free_port()
    log = tmp / "server.log"
    proc = start(["bash", "scripts/serve.sh", str(gguf_file), "--port", str(port), "--api_key", KEY], log)
    try:
        reference = greedy_reference(copy_model_dir, tmp)
        wait_until_up(f"http://127.0.0.1:{port}/health", proc, log)
        yield {"url": f"http://127.0.0.1:{port}/v1", "model": str(gguf_file), "key": KEY, "reference": reference,
               "proc": proc, "log": log}
    finally:
        stop(proc)


@pytest.mark.slow
def test_streamed_chunks_join_to_the_same_answer(served, client):
    question = QUESTIONS[0]
    chunks = [c.choices[0].delta.content or "" for c in ask(client, served["model"], question, stream=True)
              if c.choices]
    assert len([c for c in chunks if c]) > 1
    assert "".join(chunks) == served["reference"][question]


@pytest.mark.slow
def test_text_completions_use_the_training_tokenizer_and_the_recipes_length(served, client, sp):
    """A text prompt gets the file's bos, its special tokens are parsed, the rest is sentencepiece's: the
    rendered prompt without its first <s> is the training prompt. Without max_tokens: the recipe's 128."""
    question = (FIRST, "one two three")
    text = "### Input:\none two three\n\n### Instruction:\nSay the first word.\n\n### Response:</s><s>"
    reply = client.completions.create(model=served["model"], prompt=text, temperature=0)
    assert reply.usage.prompt_tokens == len(clean_ids(sp, *question))
    assert reply.choices[0].text == served["reference"][question]
    reply = client.completions.create(model=served["model"], prompt=text, temperature=0,
                                      extra_body={"logit_bias": {"2": -100.0}})  # never the eos
    assert reply.usage.completion_tokens == 128


@pytest.mark.slow
def test_bad_requests_get_the_guards_4xx_and_the_server_answers_the_next(served, client, sp):
    import httpx

    long_context = " ".join(["kiwi"] * 1100)
    n_long = len(clean_ids(sp, REPEAT, long_context))
    template_refuses = "the model's chat template refuses these messages: "
    expected = {  # status, param, code, message
        "empty_messages": (400, "messages", None, "messages must be a non-empty list of {role, content} objects"),
        "negative_max_tokens": (400, "max_tokens", None, "max_tokens must be a positive integer, got -1"),
        "longer_than_context": (400, "messages", "context_length_exceeded",
                                f"the prompt is {n_long} tokens; this model's context is 1024 tokens"),
        "unknown_model": (404, "model", "model_not_found", f"model 'no/such-model' is not served here; this server "
                          f"serves {served['model']!r} (GET /v1/models)"),
        "system_message": (400, "messages", None, template_refuses + "only user and assistant messages are supported "
                           "(got system); give a context as INSTRUCTION ### Input: CONTEXT"),
        "roles_not_alternating": (400, "messages", None, template_refuses + "messages must alternate user, assistant, "
                                  "user, ... starting with user"),
        "malformed_json": (400, None, None, "the request body is not valid JSON: Expecting value: line 1 column 29 "
                           "(char 28)"),
    }
    bodies = {name: json.dumps({"model": served["model"], **body}) for name, body in BAD_REQUESTS.items()}
    bodies["malformed_json"] = '{"model": "x", "messages": ['
    assert set(bodies) == set(expected)
    for name, body in bodies.items():
        response = httpx.post(served["url"] + "/chat/completions", content=body, timeout=60,
                              headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
        error = response.json()["error"]
        assert (response.status_code, error["param"], error["code"], error["message"]) == expected[name], name
    assert served["proc"].poll() is None
    assert ask(client, served["model"], QUESTIONS[0]).choices[0].message.content == served["reference"][QUESTIONS[0]]


@pytest.mark.slow
def test_without_the_key_a_request_gets_401_and_never_reaches_the_model(served):
    import httpx
    from openai import AuthenticationError, OpenAI

    for key in ("none", "wrong"):
        with pytest.raises(AuthenticationError) as caught:
            OpenAI(base_url=served["url"], api_key=key, max_retries=0).chat.completions.create(
                model=served["model"], messages=[{"role": "user", "content": REPEAT}], max_tokens=1)
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    assert httpx.post(served["url"] + "/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(served["url"].removesuffix("/v1") + "/health").status_code == 200
    log = served["log"].read_text()
    assert log.count("[serve] 401 POST /v1/chat/completions: no or wrong API key") >= 2
    assert log.count("[serve] 401 POST /v1/completions: no or wrong API key") >= 1


@pytest.mark.slow
def test_the_chat_pages_client_gets_the_answer_with_the_key(served):
    """scripts/chat.sh's client (serve/chat.py) against the GGUF engine, sending the key."""
    from serve.chat import Answerer

    answerer = Answerer(served["url"], "scripts/serve.sh MODEL --port PORT", api_key=KEY)
    *_, text = answerer.stream(FIRST, "one two three", 0.0, 0.9, 128)
    assert text == served["reference"][(FIRST, "one two three")]
