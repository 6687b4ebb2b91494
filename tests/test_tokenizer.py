"""The tokenizer gives the original's ids: ``SentencePieceProcessor.encode(text)``, for any text.

Two ``tokenizer.model`` files are trained here with OpenLLaMA-like settings: a v1-like one that
normalises (NFKC, runs of spaces folded, dummy prefix) and a v2-like one that keeps whitespace.
Each is put in a folder shaped like OpenLLaMA's (``tokenizer.model`` + ``tokenizer_config.json``)
and loaded as the trainer and ``inference.py`` load it.
"""

import json

import pytest
import sentencepiece as spm

from bench.tokenizer_exactness import PROBES, differing, train_sp_model
from model.hf_tokenizer import write_hf_tokenizer
from model.llama import save_model_metadata
from model.tokenizer import load_tokenizer
from openalpaca.prompts import encode_sample, prompt_ids
from tests.conftest import run
from tests.exact_tokenizer import QUESTIONS, assert_exact_tokenizer, chat_ids, prompt_text, user_message


@pytest.fixture(scope="module", params=["v1", "v2", "demo"])
def folder(request, tmp_path_factory):
    """A folder shaped like a downloaded OpenLLaMA's tokenizer (``tokenizer.model`` and OpenLLaMA's
    ``tokenizer_config.json``): v1-like (NFKC, spaces folded), v2-like (whitespace kept), the demo's
    (``\\n`` a user-defined piece)."""
    return train_sp_model(tmp_path_factory.mktemp("tok") / request.param, request.param)


@pytest.fixture(scope="module")
def exact(folder, tmp_path_factory):
    """The same tokenizer with the exact files written beside it (original layout)."""
    out = tmp_path_factory.mktemp("exact")
    write_hf_tokenizer(folder, "original", out_dir=out)
    return out


# What each model's own normaliser does to text (sentencepiece's normalizer_spec, as trained by
# bench/tokenizer_exactness.py): v1 maps NFKC and folds runs of ASCII spaces, v2 and demo keep text as it is.
SAME_IDS = {"v1": [("a   b  c", "a b c"), ("ＡＢＣ １２３", "ABC 123"), ("ﬁve", "five")]}
OTHER_IDS = {"v2": [("a   b  c", "a b c"), ("ＡＢＣ １２３", "ABC 123")],
             "demo": [("a   b  c", "a b c"), ("ＡＢＣ １２３", "ABC 123")]}


def test_the_loader_gives_the_slow_tokenizers_ids_with_the_models_own_normaliser(folder):
    """The original's slow ``LlamaTokenizer`` was sentencepiece: ids that follow the model's own
    normaliser (a converted ``tokenizers`` BPE has none: v1's folded spaces and NFKC would be lost),
    and a bos in front. The pairs above are what the normaliser spec says, not what the code does."""
    tokenizer = load_tokenizer(folder)
    kind = folder.name
    for a, b in SAME_IDS.get(kind, []):
        assert tokenizer.encode(a, add_special_tokens=False) == tokenizer.encode(b, add_special_tokens=False), a
    for a, b in OTHER_IDS.get(kind, []):
        assert tokenizer.encode(a, add_special_tokens=False) != tokenizer.encode(b, add_special_tokens=False), a
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert len(PROBES) >= 70
    for text in PROBES:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), repr(text)
        assert tokenizer.encode(text) == [1, *ids], repr(text)  # the original's add_bos_token


def test_a_converted_tokenizer_would_not_do(folder):
    """Why the folder is read by sentencepiece: transformers' converted tokenizer differs on such text."""
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    converted = AutoTokenizer.from_pretrained(str(folder))
    differ = differing(converted, sp, PROBES)
    assert differ, "the converted tokenizer matches on every probe: this test no longer shows the difference"


def test_tokenizer_saved_next_to_a_checkpoint_reloads_with_the_same_ids(folder, tmp_path):
    class Config:
        def save_pretrained(self, dst):
            (dst / "config.json").write_text("{}")

    class Model:
        config = Config()

    tokenizer = load_tokenizer(folder)
    save_model_metadata(Model(), tokenizer, tmp_path, "original")
    # The same model file, byte for byte, is the same ids for every text.
    assert (tmp_path / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    assert_exact_tokenizer(tmp_path, "original")  # what the trainer writes next to its checkpoints


def test_decode_keeps_or_skips_the_special_pieces(folder):
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokenizer = load_tokenizer(folder)
    ids = sp.encode("what is an alpaca")
    assert tokenizer.decode([1, *ids, 2]) == "<s>" + sp.decode(ids) + "</s>"
    assert tokenizer.decode([1, *ids, 2], skip_special_tokens=True) == sp.decode(ids)


# ---------------------------------------------------------------- the exact files (model/hf_tokenizer.py)


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_exact_files_give_sentencepieces_ids_through_autotokenizer(folder, tmp_path, layout):
    write_hf_tokenizer(folder, layout, out_dir=tmp_path)
    assert_exact_tokenizer(tmp_path, layout)


def test_chat_template_gives_the_training_prompt_of_both_layouts(exact, tmp_path):
    """Both prompt templates, both layouts: ``apply_chat_template`` equals ``prompt_ids`` and the
    ids written out here (the template built by hand, then ``[1, 1, P, 2, 1]`` / ``[1, P, 2, 1]``)."""
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(exact / "tokenizer.model"))
    for layout in ("original", "clean"):
        write_hf_tokenizer(exact, layout, out_dir=tmp_path / layout)
        tok = AutoTokenizer.from_pretrained(str(tmp_path / layout))
        for instruction, input in QUESTIONS:
            by_hand = ([1, 1] if layout == "original" else [1]) + sp.encode(prompt_text(instruction, input.strip()))
            ids = chat_ids(tok, [user_message(instruction, input)])
            assert ids == by_hand + [2, 1]
            assert ids == prompt_ids(load_tokenizer(exact), instruction, input.strip(), layout)
            assert chat_ids(tok, [user_message(instruction, input)], add_generation_prompt=False) == by_hand


def test_multi_turn_history_is_rendered_as_completed_training_samples(exact, tmp_path):
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(exact / "tokenizer.model"))
    turns = [("Name a colour.", "", "red"), ("Summarise it.", "a  long text", "short  text"), ("And now?", "", None)]
    messages = []
    for instruction, input, answer in turns:
        messages.append(user_message(instruction, input))
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    for layout in ("original", "clean"):
        write_hf_tokenizer(exact, layout, out_dir=tmp_path / layout)
        tok = AutoTokenizer.from_pretrained(str(tmp_path / layout))
        bos = [1, 1] if layout == "original" else [1]
        expected = []
        for instruction, input, answer in turns[:2]:  # [1,1,P,2,1,1,O,2] / [1,P,2,1,O,2]
            expected += [*bos, *sp.encode(prompt_text(instruction, input)), 2, *bos, *sp.encode(answer), 2]
        completed = sum((encode_sample(load_tokenizer(exact), i, x, a, 10_000, _fmt(layout)).input_ids
                         for i, x, a in turns[:2]), [])
        assert expected == completed  # a completed turn is the training sample
        expected += [*bos, *sp.encode(prompt_text(*turns[2][:2])), 2, 1]
        assert chat_ids(tok, messages) == expected


def _fmt(layout):
    from openalpaca.prompts import SampleFormat

    return SampleFormat(layout=layout, truncation="keep_end")


@pytest.mark.parametrize("messages, message", [
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "only user and assistant"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be a user"),
])
def test_chat_template_refuses_what_the_recipe_cannot_render(exact, messages, message):
    from jinja2 import TemplateError
    from transformers import AutoTokenizer

    with pytest.raises((TemplateError, ValueError), match=message):
        chat_ids(AutoTokenizer.from_pretrained(str(exact)), messages)


@pytest.mark.parametrize("layout", ["original", "clean"])
def test_the_template_itself_refuses_an_empty_conversation(layout):
    """transformers refuses ``[]`` before rendering; other renderers (llama-cpp-python, vLLM's own
    Jinja) do not, so the template must: rendered here with a plain sandboxed Jinja environment."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from model.hf_tokenizer import chat_template

    def raise_exception(message):
        raise TemplateError(message)

    template = ImmutableSandboxedEnvironment().from_string(chat_template(layout))
    with pytest.raises(TemplateError, match="^messages must not be empty$"):
        template.render(messages=[], bos_token="<s>", eos_token="</s>", add_generation_prompt=True,
                        raise_exception=raise_exception)


def test_content_parts_render_as_plain_text(exact):
    """Text parts are joined, then read as one user message: ids written out by hand (original layout)."""
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(exact / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(exact))
    parts = [{"role": "user", "content": [{"type": "text", "text": "Summarise it. ### Input: "},
                                          {"type": "text", "text": "Some text."}]}]
    by_hand = [1, 1, *sp.encode("### Input:\nSome text.\n\n### Instruction:\nSummarise it.\n\n### Response:"), 2, 1]
    assert chat_ids(tok, parts) == by_hand


def test_the_seed_snippets_llama_tokenizer_class_ignores_the_exact_files(exact):
    """Why the README says AutoTokenizer: transformers 5's LlamaTokenizer rebuilds a pipeline of its own."""
    from transformers import LlamaTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(exact / "tokenizer.model"))
    assert differing(LlamaTokenizer.from_pretrained(str(exact)), sp, PROBES)


def test_exact_tokenizer_sh_adds_the_files_to_a_downloaded_base_folder(tmp_path):
    base = train_sp_model(tmp_path / "openllama_ckpt", "v1")
    (base / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    done = run(["bash", "scripts/exact_tokenizer.sh", str(base), "--layout", "clean"])
    assert done.returncode == 0, done.stderr
    assert_exact_tokenizer(base, "clean")
    beside = tmp_path / "tokenizer_only"
    done = run(["bash", "scripts/exact_tokenizer.sh", str(base), "--out_dir", str(beside)])
    assert done.returncode == 0, done.stderr
    assert_exact_tokenizer(beside, "original")
    assert not list(beside.glob(".*.tmp")) and not list(base.glob(".*.tmp"))


def test_exact_tokenizer_sh_names_a_folder_without_tokenizer_model(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run(["bash", "scripts/exact_tokenizer.sh", str(tmp_path / "empty")])
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'empty'}: no tokenizer.model to build the tokenizer from"]
    assert list((tmp_path / "empty").iterdir()) == []
