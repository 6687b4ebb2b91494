"""Which loaders give sentencepiece's ids: a table of loader x tokenizer model, texts that differ.

    python bench/tokenizer_exactness.py [--fuzz 3000] [--gguf]

Three ``tokenizer.model`` files are trained on the fly (no download): ``v1`` like OpenLLaMA v1
(``nmt_nfkc``, runs of spaces folded, dummy prefix, byte fallback), ``v2`` like OpenLLaMA v2
(identity normaliser, whitespace kept, whitespace-only pieces, digits split) and ``demo``, the CPU
demo's (identity, ``\\n`` a user-defined piece). Each sits in a folder shaped like a downloaded
OpenLLaMA (``tokenizer.model`` and a ``tokenizer_config.json`` naming ``LlamaTokenizer``), then
the same folder after ``scripts/exact_tokenizer.sh``. For every loader the count is of ``PROBES``
whose ``encode(text, add_special_tokens=False)`` differs from ``SentencePieceProcessor.encode``.
``--fuzz N`` adds N random strings (spaces, newlines, tabs, ideographic space, full-width letters,
ligatures, zero-width and combining characters, emoji, pieces of ``<s>``) to the probes. ``--gguf``
adds two loaders: each folder (with tiny random weights) exported by ``scripts/export_gguf.sh``'s
code to an f32 GGUF, tokenized by llama.cpp itself (llama-cpp-python, special tokens as text) and by
the project's GGUF engine (``scripts/serve.sh FILE.gguf``'s tokenizer).
Prints a markdown table and one JSON line. The tests use the same probes and models.
"""

from __future__ import annotations

import io
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece as spm

from demo.tiny import TOKENIZER_CONFIG, train_tokenizer
from openalpaca.prompts import build_prompt

KINDS = ("v1", "v2", "demo")
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
# Text that NFKC (v1's nmt_nfkc) changes: full-width forms, ligatures, ideographic space, zero-width
# and other format characters, compatibility digits and letters, combining sequences.
NFKC = [
    "ＡＢＣ ｆｕｌｌ ｗｉｄｔｈ １２３", "ﬁ ﬂ ﬃ ﬄ ligatures", "a\u3000b", "\u3000ideographic lead", "trail\u3000",
    "zero\u200bwidth\u200cnon\u200djoiner", "\ufeffbyte order mark", "soft\u00adhyphen", "①②③ circled",
    "ｶﾀｶﾅ half-width",
    "e\u0301 combining acute", "Å angstrom", "½ ⅓ fractions", "™ ℃ № letterlike", "x\u2028line separator",
    "ｈｅｌｌｏ\u3000ｗｏｒｌｄ", "ℌ𝔢𝔩𝔩𝔬 math letters", "\u2002en\u2003em\u2009thin spaces",
]


def templates() -> list[str]:
    return [build_prompt("What is an alpaca?"), build_prompt("Summarise it.", "Some  text.\nMore."),
            build_prompt("x", " "), build_prompt("", ""), build_prompt("  spaced  ", "\tin\t"),
            build_prompt("Ｆｕｌｌ ｗｉｄｔｈ？", "a\u3000b ﬁ")]


PROBES = TRICKY + NFKC + templates()
SPECIAL_STRINGS = ("<s>", "</s>", "<unk>")


def has_special_string(text: str) -> bool:
    """A literal ``<s>``, ``</s>`` or ``<unk>``: HF tokenizers read it as the special token
    (chat templates need that); sentencepiece reads it as text."""
    return any(s in text for s in SPECIAL_STRINGS)


def train_sp_model(folder: Path, kind: str) -> Path:
    """A folder shaped like a downloaded OpenLLaMA's tokenizer: ``tokenizer.model`` of ``kind``
    and OpenLLaMA's ``tokenizer_config.json`` (the slow class, a bos added)."""
    if kind == "demo":
        train_tokenizer(["what is an alpaca", "how different from a llama", " ".join(WORDS)] * 20, folder, 400)
        return folder
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)] + TRICKY + templates()
    settings = dict(normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True) if kind == "v1" else dict(
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        split_digits=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, model_type="bpe", vocab_size=600, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=0.9995, add_dummy_prefix=True,
        num_threads=1, minloglevel=2, **settings)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return folder


def differing(tokenizer, sp: spm.SentencePieceProcessor, texts: list[str], split_special: bool = False) -> list[str]:
    """The texts whose ids differ from sentencepiece's (no special tokens added; ``split_special``:
    literal special-token strings encoded as text)."""
    kwargs = {"split_special_tokens": True} if split_special else {}
    return [t for t in texts if tokenizer(t, add_special_tokens=False, **kwargs)["input_ids"] != sp.encode(t)]


FUZZ_ALPHABET = list("abc xyz  \n\t\r") + ["the", "alpaca", "llama", " ", "  ", "\u3000", "ＡＢ", "ﬁ", "\u200b", "é",
                                               "e\u0301", "日本", "🦙", "½", "\u00a0", "\ufeff", "<", ">", "s", "/",
                                               "###", ":"]


def fuzz(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 20))) for _ in range(n)]


def gguf_rows(folder: Path, sp: spm.SentencePieceProcessor, probes: list[str]) -> dict[str, int]:
    """The folder as a GGUF: llama.cpp's own ids and the project's engine's, against sentencepiece's."""
    import llama_cpp

    from demo.tiny import llama_config, tokenizer_vocab_size, write_tiny_llama
    from model.gguf import export_gguf, read_metadata
    from serve.llamacpp import attach_tokenizer

    write_tiny_llama(folder, llama_config(tokenizer_vocab_size(folder), hidden_size=32, num_layers=1, num_heads=2))
    path = export_gguf(folder, out=str(folder.parent / f"{folder.name}.gguf"), types=["f32"])["f32"]
    rows = {}
    for name, engine in (("llama.cpp, GGUF", False), ("serve.sh FILE.gguf (the project's engine)", True)):
        llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        if engine:
            attach_tokenizer(llama, str(path), read_metadata(path))
        rows[name] = sum(llama.tokenize(t.encode(), add_bos=False, special=False) != sp.encode(t) for t in probes)
        llama.close()
    return rows


def measure(root: Path, probes: list[str] = PROBES, gguf: bool = False) -> dict[str, dict[str, int]]:
    from transformers import AutoTokenizer, LlamaTokenizer

    from model.hf_tokenizer import write_hf_tokenizer

    table: dict[str, dict[str, int]] = {}
    for kind in KINDS:
        folder = train_sp_model(root / kind, kind)
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        bare = {"AutoTokenizer": AutoTokenizer.from_pretrained(str(folder)),
                "LlamaTokenizer": LlamaTokenizer.from_pretrained(str(folder))}
        row = {f"{name}, tokenizer.model only": len(differing(tok, sp, probes)) for name, tok in bare.items()}
        write_hf_tokenizer(folder, "original")
        exact = AutoTokenizer.from_pretrained(str(folder))
        row["AutoTokenizer, exact files"] = len(differing(exact, sp, probes))
        row["AutoTokenizer, exact files, split_special_tokens=True"] = len(differing(exact, sp, probes, True))
        row["LlamaTokenizer, exact files"] = len(differing(LlamaTokenizer.from_pretrained(str(folder)), sp, probes))
        if gguf:
            row.update(gguf_rows(folder, sp, probes))
        table[kind] = row
    return table


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz", type=int, default=0, help="random strings added to the probes")
    parser.add_argument("--gguf", action="store_true", help="also llama.cpp's tokenizer and the project's GGUF engine")
    args = parser.parse_args(argv)
    probes = PROBES + fuzz(args.fuzz)
    with tempfile.TemporaryDirectory() as tmp:
        table = measure(Path(tmp), probes, args.gguf)
    loaders = list(next(iter(table.values())))
    literal = sum(has_special_string(t) for t in probes)
    print(f"texts whose ids differ from SentencePieceProcessor.encode, of {len(probes)} "
          f"({literal} hold a literal special-token string)\n")
    print("| loader | " + " | ".join(f"{k}-like" for k in KINDS) + " |")
    print("|--|" + "--|" * len(KINDS))
    for loader in loaders:
        print(f"| {loader} | " + " | ".join(str(table[k][loader]) for k in KINDS) + " |")
    print(json.dumps({"probes": len(probes), "literal_special": literal, "differing": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
