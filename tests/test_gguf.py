"""scripts/export_gguf.sh (model/gguf.py): GGUF files with the training ids, their chat template and ollama's.

Three tiny models, one per tokenizer kind of ``bench/tokenizer_exactness.py`` (v1-like: nmt_nfkc
and folded spaces; v2-like: identity; demo-like: ``\\n`` a user-defined piece), are exported once
for the module (f32). Expected ids always come from ``SentencePieceProcessor`` and prompt text
written out here, never from the code under test.

* Ids: llama.cpp's own tokenizer on each GGUF against sentencepiece over the probes (measured; a
  change in llama.cpp shows up here), and the project's GGUF engine path (the tokenizer it
  attaches) differing on none.
* The GGUF's Jinja template, rendered as llama-cpp-python renders it and tokenized by the engine's
  tokenizer, and the Modelfile's Go template, rendered by Go's own ``text/template`` with ollama's
  data shape and tokenized as ollama's runner does (llama.cpp, a bos added, special tokens
  parsed), both give the training prompt: with and without input, and two turns.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import sentencepiece as spm

from bench.tokenizer_exactness import PROBES, has_special_string, train_sp_model
from tests.conftest import run

KINDS = {"v1": "original", "v2": "clean", "demo": "clean"}  # tokenizer kind -> the layout its GGUF gets
# Probes (of 74) whose ids from llama.cpp's own tokenizer differ from sentencepiece's, measured with
# llama-cpp-python 0.3.36. A change means llama.cpp's tokenizer changed: update docs/local-models.md.
LLAMA_CPP_DIFFERING = {"v1": 48, "v2": 0, "demo": 0}
GO = shutil.which("go")


def prompt_text(instruction: str, context: str) -> str:
    """The seed README's two templates, written out."""
    if context:
        return f"### Input:\n{context}\n\n### Instruction:\n{instruction}\n\n### Response:"
    return f"### Instruction:\n{instruction}\n\n### Response:"


def user(instruction: str, context: str = "") -> dict[str, str]:
    return {"role": "user", "content": f"{instruction} ### Input: {context}" if context else instruction}


def sample_ids(sp, layout: str, instruction: str, context: str, answer: str | None = None) -> list[int]:
    """A prompt (``answer`` None) or a completed sample of ``layout``, from sentencepiece by hand."""
    bos = [1, 1] if layout == "original" else [1]
    ids = [*bos, *sp.encode(prompt_text(instruction, context)), 2]
    return ids + [1] if answer is None else ids + [*bos, *sp.encode(answer), 2]


# (messages, the turns they must give: (instruction, context, answer or None for the open prompt))
CONVERSATIONS = {
    "with_input": ([user("Summarise the text.", "Alpacas  are\ncamelids.")],
                   [("Summarise the text.", "Alpacas  are\ncamelids.", None)]),
    "no_input": ([user("  What is an alpaca? ")], [("What is an alpaca?", "", None)]),
    "two_turns": ([user("Name a fruit."), {"role": "assistant", "content": "apple pear"},
                   user("Repeat the words.", "\tred  plum ")],
                  [("Name a fruit.", "", "apple pear"), ("Repeat the words.", "red  plum", None)]),
}


def expected_ids(sp, layout: str, turns) -> list[int]:
    return [i for instruction, context, answer in turns for i in sample_ids(sp, layout, instruction, context, answer)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, dict]:
    """Per tokenizer kind: a tiny random LLaMA folder shaped like a downloaded OpenLLaMA (tokenizer.model
    and the slow class's tokenizer_config.json, no tokenizer.json) and its f32 GGUF."""
    from demo.tiny import llama_config, tokenizer_vocab_size, write_tiny_llama
    from model.gguf import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    found = {}
    for kind, layout in KINDS.items():
        folder = train_sp_model(root / kind, kind)
        write_tiny_llama(folder, llama_config(tokenizer_vocab_size(folder), hidden_size=32, num_layers=1, num_heads=2))
        listing = sorted(p.name for p in folder.iterdir())
        path = export_gguf(folder, types=["f32"], layout=layout)["f32"]
        found[kind] = {"folder": folder, "gguf": path, "layout": layout, "listing": listing,
                       "sp": spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))}
    return found


def engine_llama(path: Path):
    """The GGUF as the project's engine tokenizes it: llama-cpp-python's ``Llama`` with the tokenizer
    ``serve.llamacpp`` attaches (vocabulary only: no weights are needed for ids)."""
    import llama_cpp

    from model.gguf import read_metadata
    from serve.llamacpp import attach_tokenizer

    llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    attach_tokenizer(llama, str(path), read_metadata(path))
    return llama


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_tokenizer_is_measured_and_the_engine_path_differs_on_no_probe(exported, kind):
    import llama_cpp

    found, sp = exported[kind], exported[kind]["sp"]
    plain = llama_cpp.Llama(str(found["gguf"]), vocab_only=True, verbose=False)
    differing = [t for t in PROBES if plain.tokenize(t.encode(), add_bos=False, special=False) != sp.encode(t)]
    plain.close()
    assert len(differing) == LLAMA_CPP_DIFFERING[kind], differing
    if kind == "v1":  # both prompt templates are among them
        assert prompt_text("What is an alpaca?", "") in differing
        assert prompt_text("Summarise it.", "Some  text.\nMore.") in differing

    engine = engine_llama(found["gguf"])
    try:
        assert [t for t in PROBES if engine.tokenize(t.encode(), add_bos=False, special=False) != sp.encode(t)] == []
        assert [t for t in PROBES if not has_special_string(t)
                and engine.tokenize(t.encode(), add_bos=False, special=True) != sp.encode(t)] == []
        assert engine.tokenize(b"x", add_bos=True, special=True) == [1, *sp.encode("x")]  # the GGUF's add_bos
        assert [t for t in PROBES if engine.detokenize(sp.encode(t)).decode() != sp.decode(sp.encode(t))] == []
    finally:
        engine.close()


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_carries_the_recipe_and_the_modelfile_sits_beside_it(exported, kind):
    from model.gguf import KEY_LAYOUT, KEY_SP_MODEL, read_metadata
    from model.hf_tokenizer import chat_template, ollama_template

    found = exported[kind]
    meta = read_metadata(found["gguf"])
    assert meta[KEY_SP_MODEL] == (found["folder"] / "tokenizer.model").read_bytes()
    assert meta[KEY_LAYOUT] == found["layout"]
    assert meta["tokenizer.chat_template"] == chat_template(found["layout"])
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.add_eos_token"] is False
    assert (meta["general.sampling.top_k"], round(meta["general.sampling.top_p"], 6)) == (50, 0.9)
    assert meta["llama.context_length"] == 1024 and meta["general.file_type"] == 0  # f32
    assert sorted(p.name for p in found["folder"].iterdir()) == found["listing"]  # nothing written into MODEL

    text = found["gguf"].with_suffix(".Modelfile").read_text()
    assert f"\nFROM ./{found['gguf'].name}\n" in text
    assert f'\nTEMPLATE """{ollama_template(found["layout"])}"""\n' in text
    params = [line.split(" ", 2)[1:] for line in text.splitlines() if line.startswith("PARAMETER ")]
    assert params == [["stop", '"</s>"'], ["top_k", "50"], ["top_p", "0.9"], ["num_predict", "128"],
                      ["temperature", "1"], ["repeat_penalty", "1"], ["num_ctx", "1024"]]


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_gguf_chat_template_gives_the_training_ids(exported, kind, name):
    """Rendered as llama-cpp-python renders a GGUF's template, tokenized as the engine tokenizes it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from model.gguf import read_metadata
    from openalpaca.prompts import prompt_ids

    found, sp = exported[kind], exported[kind]["sp"]
    messages, turns = CONVERSATIONS[name]
    formatter = Jinja2ChatFormatter(template=read_metadata(found["gguf"])["tokenizer.chat_template"],
                                    eos_token="</s>", bos_token="<s>")
    engine = engine_llama(found["gguf"])
    try:
        ids = engine.tokenize(formatter(messages=messages).prompt.encode(), add_bos=False, special=True)
    finally:
        engine.close()
    assert ids == expected_ids(sp, found["layout"], turns)
    if len(turns) == 1:
        assert ids == prompt_ids(sp_tokenizer(sp), *turns[0][:2], layout=found["layout"])


def sp_tokenizer(sp):
    class Encoder:
        def encode(self, text, add_special_tokens=True):
            return ([1] if add_special_tokens else []) + sp.encode(text)

    return Encoder()


# ---------------------------------------------------------------- ollama's Go template

GO_RENDER = r"""
// Renders a Go template as ollama does: text/template with missingkey=zero and ollama's template
// functions, executed with ollama's data for a template that uses .Messages.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

type message struct {
	Role, Content, Thinking, ToolName, ToolCallID string
	Images                                        []string
	ToolCalls                                     []any
}

func main() {
	src, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	funcs := template.FuncMap{
		"json":             func(v any) string { b, _ := json.Marshal(v); return string(b) },
		"currentDate":      func(args ...string) string { return "2026-12-03" },
		"yesterdayDate":    func(args ...string) string { return "2026-12-02" },
		"toTypeScriptType": func(v any) string { return "any" },
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(string(src))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var cases [][]message
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []map[string]string{}
	for _, msgs := range cases {
		ptrs := make([]*message, len(msgs))
		for i := range msgs {
			ptrs[i] = &msgs[i]
		}
		var b bytes.Buffer
		err := tmpl.Execute(&b, map[string]any{"System": "", "Messages": ptrs, "Tools": nil, "Response": "",
			"Think": false, "ThinkLevel": "", "IsThinkSet": false})
		if err != nil {
			out = append(out, map[string]string{"error": err.Error()})
		} else {
			out = append(out, map[string]string{"text": b.String()})
		}
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """``render(template, conversations)``: Go's text/template, built once for the module."""
    if not GO:
        pytest.skip("no go (Debian: golang-go; scripts/setup.sh installs it as root)")
    root = tmp_path_factory.mktemp("go")
    (root / "render.go").write_text(GO_RENDER)
    build = subprocess.run([GO, "build", "-o", str(root / "render"), str(root / "render.go")], cwd=root,
                           capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr

    def render(template: str, conversations: list[list[dict]]) -> list[dict]:
        (root / "template.txt").write_text(template)
        cases = [[{"Role": m["role"], "Content": m["content"]} for m in msgs] for msgs in conversations]
        done = subprocess.run([str(root / "render"), str(root / "template.txt")], input=json.dumps(cases),
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return render


def modelfile_template(layout: str) -> str:
    """The TEMPLATE of the Modelfile the export writes for ``layout``, cut out of the file's text."""
    from model.gguf import modelfile

    text = modelfile("model.gguf", layout, 2048)
    return text.split('TEMPLATE """', 1)[1].split('"""\n', 1)[0]


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_modelfile_template_through_go_and_ollamas_runner_gives_the_training_ids(exported, go_render, layout):
    """Go renders it; the runner's tokenization is llama.cpp's with a bos added (the GGUF's add_bos_token) and
    special tokens parsed, on the v2-like GGUF, where llama.cpp's ids are sentencepiece's."""
    import llama_cpp

    found, sp = exported["v2"], exported["v2"]["sp"]
    names = list(CONVERSATIONS)
    bad = [[{"role": "system", "content": "Be brief."}, user("Name a fruit.")], [user("a"), user("b")],
           [{"role": "assistant", "content": "x"}]]
    rendered = go_render(modelfile_template(layout), [CONVERSATIONS[n][0] for n in names] + bad)
    runner = llama_cpp.Llama(str(found["gguf"]), vocab_only=True, verbose=False)
    try:
        for name, out in zip(names, rendered, strict=False):
            assert "text" in out, (name, out)
            assert out["text"].startswith({"original": "<s>###", "clean": "###"}[layout])  # the runner adds one bos
            ids = runner.tokenize(out["text"].encode(), add_bos=True, special=True)
            assert ids == expected_ids(sp, layout, CONVERSATIONS[name][1]), name
    finally:
        runner.close()
    errors = [out.get("error", "") for out in rendered[len(names):]]
    assert "only user and assistant messages are supported" in errors[0]
    assert "messages must alternate user, assistant" in errors[1] and "messages must alternate" in errors[2]


# ---------------------------------------------------------------- the command line

def test_bad_input_gets_one_line_and_nothing_is_written(exported, tmp_path, capsys):
    from model.gguf import main

    folder = exported["v2"]["folder"]
    no_sp = tmp_path / "no_sp"
    shutil.copytree(folder, no_sp, ignore=shutil.ignore_patterns("tokenizer.model"))
    taken = tmp_path / "taken-q8_0.gguf"
    taken.write_text("")
    out = tmp_path / "out"
    out.mkdir()
    cases = {
        "missing": ([str(tmp_path / "nope")], f"{tmp_path / 'nope'}: model folder not found"),
        "no_tokenizer_model": ([str(no_sp)], f"{no_sp}: no tokenizer.model (the GGUF embeds it"),
        "bad_type": ([str(folder), "--quant", "q8_0,q9_x"], "--quant q8_0,q9_x: unknown type q9_x; choose from"),
        "not_gguf": ([str(folder), "--out", str(out / "m.bin")], f"--out {out / 'm.bin'}: the file name must end"),
        "no_type_slot": ([str(folder), "--quant", "f16,q8_0", "--out", str(out / "m.gguf")],
                         f"--out {out / 'm.gguf'}: several types need {{type}} in the file name"),
        "exists": ([str(folder), "--out", str(taken)], f"{taken}: already exists (pass --overwrite"),
    }
    for name, (argv, message) in cases.items():
        assert main(argv) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), (name, err)
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_sp", "out", "taken-q8_0.gguf"]


def test_a_save_path_is_exported_first(exported, tmp_path, monkeypatch):
    """A DeepSpeed save path (``latest``, no weights) goes through model.export into a temp folder; its
    train_config.yaml's layout is the GGUF's. (The export itself: tests/test_export.py.)"""
    import model.export
    from model.gguf import KEY_LAYOUT, export_gguf, read_metadata

    save = tmp_path / "save"
    save.mkdir()
    hf = exported["demo"]["folder"]
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(hf / name, save / name)
    (save / "latest").write_text("global_step3")
    (save / "global_step3").mkdir()
    (save / "train_config.yaml").write_text("layout: original\n")
    calls = []

    def fake_export(save_path, out_dir, dtype=None, **_):
        calls.append(Path(save_path))
        shutil.copytree(hf, out_dir)
        return Path(out_dir)

    monkeypatch.setattr(model.export, "export", fake_export)
    path = export_gguf(save, types=["f16"])["f16"]
    assert calls == [save] and path == tmp_path / "save-f16.gguf"
    meta = read_metadata(path)
    assert meta[KEY_LAYOUT] == "original" and meta["general.file_type"] == 1  # f16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save", "save-f16.Modelfile", "save-f16.gguf"]


@pytest.mark.slow
def test_export_gguf_sh_quantizes_keeps_the_keys_and_warns_for_a_v1_tokenizer(exported, tmp_path):
    from model.gguf import KEY_LAYOUT, KEY_SP_MODEL, normalizer_warning, read_metadata

    folder = exported["v1"]["folder"]
    result = run(["bash", "scripts/export_gguf.sh", str(folder), "--quant", "q8_0,q4_k_m",
                  "--out", str(tmp_path / "m-{type}.gguf")], timeout=300)
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: ")
               and "ggml-org/llama.cpp#2023" in line]
    assert len(warning) == 1 and str(folder / "tokenizer.model") in warning[0]
    for qtype, file_type in (("q8_0", 7), ("q4_k_m", 15)):  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
        meta = read_metadata(tmp_path / f"m-{qtype}.gguf")
        assert meta["general.file_type"] == file_type
        assert meta[KEY_SP_MODEL] == (folder / "tokenizer.model").read_bytes() and meta[KEY_LAYOUT] == "original"
        assert (tmp_path / f"m-{qtype}.Modelfile").read_text().count(f"FROM ./m-{qtype}.gguf\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m-q4_k_m.Modelfile", "m-q4_k_m.gguf", "m-q8_0.Modelfile", "m-q8_0.gguf"]
    assert normalizer_warning(exported["v2"]["folder"] / "tokenizer.model") is None
