"""The tokenizer gives the original's ids: ``SentencePieceProcessor.encode(text)``, for any text.

Two ``tokenizer.model`` files are trained here with OpenLLaMA-like settings: a v1-like one that
normalises (NFKC, runs of spaces folded, dummy prefix) and a v2-like one that keeps whitespace.
Each is put in a folder shaped like OpenLLaMA's (``tokenizer.model`` + ``tokenizer_config.json``)
and loaded as the trainer and ``inference.py`` load it.
"""

import io
import json
import random

import pytest
import sentencepiece as spm

from model.llama import save_model_metadata
from model.tokenizer import load_tokenizer
from openalpaca.prompts import build_prompt

WORDS = "what is an alpaca how different from a llama write the capital of tanzania summarise text 42 seed".split()
TRICKY = [
    "", " ", "  ", "\n", "\n\n", "\t", "a  b", "a   b  c", " leading", "trailing ", "  both  ", "tab\there",
    "new\nline", "crlf\r\nline", "line\n\n\nbreaks", " \n ", "x\u00a0y", "ﬁve ﬂags", "Ｆｕｌｌｗｉｄｔｈ", "café naïve",
    "日本語のテキスト", "emoji 🦙 alpaca", "1234567890", "3.14159 and 2,718", "x=1; y=2", "def f(x):\n    return x",
    "    indented code", "ALL CAPS", "MiXeD CaSe", "snake_case_name", "a-b-c", "(parens) [brackets] {braces}",
    "quotes \"double\" 'single'", "back\\slash", "<s> looks special </s>", "<unk>", "###", "### Response:",
    "end with newline\n", "\nstart with newline", "zero\u200bwidth", "accents: àéîõü", "ellipsis…", "dash — dash",
    "a\tb\tc", "multiple   \t  mixed", "URL https://example.com/a?b=c", "email a@b.c", "ümlaut Ärger",
    "what is an alpaca? how is it different from a llama?",
]


def templates() -> list[str]:
    return [build_prompt("What is an alpaca?"), build_prompt("Summarise it.", "Some  text.\nMore."),
            build_prompt("x", " "), build_prompt("", ""), build_prompt("  spaced  ", "\tin\t")]


def train_folder(folder, v1_like: bool):
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)] + TRICKY + templates()
    proto = io.BytesIO()
    settings = dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True) if v1_like else dict(
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, model_type="bpe", vocab_size=600, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=0.9995, add_dummy_prefix=True,
        num_threads=1, minloglevel=2, **settings)
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    # OpenLLaMA's own tokenizer_config.json names the slow class and asks for a bos.
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048}))
    return folder


@pytest.fixture(scope="module", params=["v1_like", "v2_like"])
def folder(request, tmp_path_factory):
    return train_folder(tmp_path_factory.mktemp("tok") / request.param, v1_like=request.param == "v1_like")


def test_ids_are_sentencepieces_for_any_text(folder):
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokenizer = load_tokenizer(folder)
    texts = TRICKY + templates()
    assert len(texts) >= 55
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)
        assert tokenizer.encode(text) == [1] + sp.encode(text), repr(text)  # the original's add_bos_token


def test_a_converted_tokenizer_would_not_do(folder):
    """Why the folder is read by sentencepiece: transformers' converted tokenizer differs on such text."""
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    converted = AutoTokenizer.from_pretrained(str(folder))
    differ = [t for t in TRICKY + templates() if converted.encode(t, add_special_tokens=False) != sp.encode(t)]
    assert differ, "the converted tokenizer matches on every probe: this test no longer shows the difference"


def test_tokenizer_saved_next_to_a_checkpoint_reloads_with_the_same_ids(folder, tmp_path):
    class Config:
        def save_pretrained(self, dst):
            (dst / "config.json").write_text("{}")

    class Model:
        config = Config()

    tokenizer = load_tokenizer(folder)
    save_model_metadata(Model(), tokenizer, tmp_path, "original")
    assert (tmp_path / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    reloaded = load_tokenizer(tmp_path)
    for text in TRICKY + templates():
        assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)


def test_decode_keeps_or_skips_the_special_pieces(folder):
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokenizer = load_tokenizer(folder)
    ids = sp.encode("what is an alpaca")
    assert tokenizer.decode([1, *ids, 2]) == "<s>" + sp.decode(ids) + "</s>"
    assert tokenizer.decode([1, *ids, 2], skip_special_tokens=True) == sp.decode(ids)
