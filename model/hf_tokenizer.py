"""An exact ``tokenizer.json`` and the recipe's chat template, for the tools users load a folder with.

Inside the project every prompt is tokenised by sentencepiece (``model.tokenizer``), exactly as
the original's slow ``LlamaTokenizer``. Outside it, ``AutoTokenizer`` (vLLM,
lm-evaluation-harness, ``transformers serve``, a user's script) reads the folder. transformers 5
converts a bare ``tokenizer.model`` into a BPE with no normaliser, which gives other ids for
runs of spaces, newlines and leading spaces. ``write_hf_tokenizer`` writes what makes
``AutoTokenizer`` give sentencepiece's ids instead:

* ``tokenizer.json``, built from the model's own ``normalizer_spec`` (read from the file, so v1
  and v2 OpenLLaMA models each get theirs), in sentencepiece's order::

      precompiled charsmap      normalizers.Precompiled (absent for the identity rule)
      remove_extra_whitespaces  ASCII spaces only: leading and trailing removed, runs folded
      add_dummy_prefix          normalizers.Prepend("▁"): a normaliser, so the text after
                                <s> or </s> gets its own prefix, as sentencepiece's encode of
                                that text would
      escape_whitespaces        " " -> "▁"

  then no pre-tokeniser except one that isolates user-defined pieces (sentencepiece emits them
  whole and starts no new prefix after them), and the byte-fallback BPE with the model's vocab
  and merges ranked by piece score. ``<unk>``, ``<s>`` and ``</s>`` are special added tokens, so
  a chat template's ``<s>`` becomes id 1 (literal ``<s>`` in user text does too, as in every HF
  tokenizer; ``split_special_tokens=True`` encodes it as text, as sentencepiece does).
* ``tokenizer_config.json`` naming the generic class (``TokenizersBackend``): ``AutoTokenizer``
  then loads ``tokenizer.json`` as it is. ``LlamaTokenizer`` would rebuild its own
  normaliser-free pipeline whatever the file says. A bos is added to each text
  (``tokenizer(text)`` is ``[1] + sp.encode(text)``), as the original's tokenizer did; pad is
  ``<unk>`` (id 0), as OpenLLaMA's config.json.
* ``chat_template``: the run's layout as a Jinja template (``chat_template(layout)``).

The same layout is also written as a Go template for ollama's Modelfile (``ollama_template(layout)``):
both generators take the prompt's pieces and the layout's special tokens from this module, so the two
templates cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, SP_MODEL, ModelPathError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LAYOUTS = ("original", "clean")  # the token layouts of openalpaca/prompts.py, which imports them from here
INPUT_MARK = "### Input:"  # ``INSTRUCTION ### Input: CONTEXT`` gives a context (chat template, inference.py)
# The seed's two prompt templates (openalpaca.prompts) as the chat templates fill them in: the input block only
# when there is a context, then the instruction block.
INPUT_OPEN, INPUT_CLOSE = "### Input:\n", "\n\n"
INSTRUCTION_OPEN, INSTRUCTION_CLOSE = "### Instruction:\n", "\n\n### Response:"
MODEL_MAX_LENGTH = 2048  # OpenLLaMA's context
SPECIAL_PIECES = {0: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
NORMAL, USER_DEFINED, CONTROL = 1, 4, 3  # sentencepiece's ModelProto.SentencePiece.Type values
BPE_MODEL = 2  # TrainerSpec.model_type


def read_model_proto(model_file: str | Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _check_proto(model_file: Path, proto) -> None:
    if proto.trainer_spec.model_type != BPE_MODEL:
        raise ModelPathError(f"{model_file}: only BPE sentencepiece models are supported (LLaMA's kind)")
    pieces = {i: proto.pieces[i].piece for i in SPECIAL_PIECES if i < len(proto.pieces)}
    if pieces != SPECIAL_PIECES:
        raise ModelPathError(f"{model_file}: expected pieces {SPECIAL_PIECES} (unk, bos, eos), found {pieces}")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ModelPathError(f"{model_file}: treat_whitespace_as_suffix is not supported")


def bpe_merges(proto) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, ranked as sentencepiece's BPE ranks
    them: by the merged piece's score (higher first), then its id."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def build_tokenizer(model_file: str | Path):
    """A ``tokenizers.Tokenizer`` whose ids are ``SentencePieceProcessor.encode``'s (see the module doc)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    model_file = Path(model_file)
    proto = read_model_proto(model_file)
    _check_proto(model_file, proto)
    spec = proto.normalizer_spec
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    user_defined = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=SPECIAL_PIECES[0], fuse_unk=True,
                              byte_fallback=proto.trainer_spec.byte_fallback, ignore_merges=bool(user_defined)))

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # sentencepiece folds ASCII spaces only (not \n, \t or U+3000)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")

    steps = [decoders.Replace("▁", " ")]
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)

    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in SPECIAL_PIECES.values()])
    bos = SPECIAL_PIECES[BOS_ID]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, BOS_ID)])
    return tokenizer


def sample_bos(layout: str) -> int:
    """How many bos open a sample (and its answer) in ``layout``: ``original`` 2, ``clean`` 1."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return 2 if layout == "original" else 1


def _jinja_str(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'") + "'"


def chat_template(layout: str) -> str:
    """The recipe's prompt as a chat template: ``apply_chat_template`` gives ``prompt_ids``.

    A user message is an instruction; ``INSTRUCTION ### Input: CONTEXT`` gives it a context (the
    text after the first ``### Input:``; both parts are stripped, as ``inference.py
    --interactive`` does). With ``add_generation_prompt`` the last user message ends as the
    training prompt does: ``original`` renders ``<s><s>P</s><s>``, ``clean`` ``<s>P</s><s>``.
    Earlier turns are rendered as completed training samples of the layout
    (``original``: ``<s><s>P</s><s><s>O</s>``, ``clean``: ``<s>P</s><s>O</s>``), one after the
    other. Roles must alternate user, assistant, user...; a system message is refused (put the
    context after ``### Input:``).
    """
    extra_bos = "{{- bos_token }}" * (sample_bos(layout) - 1)
    return (
        "{#- OpenAlpaca, layout " + layout + ": a user message is INSTRUCTION, or INSTRUCTION ### Input: CONTEXT #}\n"
        "{%- if messages | length == 0 %}{{ raise_exception('messages must not be empty') }}{% endif %}\n"
        "{%- for message in messages %}\n"
        "  {%- if message['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('only user and assistant messages are supported (got ' ~ message['role'] ~ "
        "'); give a context as INSTRUCTION " + INPUT_MARK + " CONTEXT') }}{% endif %}\n"
        "  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('messages must alternate user, assistant, user, ... starting with user') }}{% endif %}\n"
        "  {%- if message['content'] is string %}{% set text = message['content'] %}\n"
        "  {%- else %}{% set ns = namespace(text='') %}"
        "{% for part in message['content'] if part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}"
        "{% endfor %}{% set text = ns.text %}{% endif %}\n"
        "  {%- if message['role'] == 'user' %}\n"
        "    {%- set parts = text.split('" + INPUT_MARK + "', 1) %}\n"
        "    {%- set instruction = parts[0] | trim %}\n"
        "    {%- set context = parts[1] | trim if parts | length > 1 else '' %}\n"
        "    {{- bos_token }}" + extra_bos + "\n"
        "    {%- if context != '' %}{{- " + _jinja_str(INPUT_OPEN) + " + context + " + _jinja_str(INPUT_CLOSE)
        + " }}{% endif %}\n"
        "    {{- " + _jinja_str(INSTRUCTION_OPEN) + " + instruction + " + _jinja_str(INSTRUCTION_CLOSE) + " }}\n"
        "  {%- else %}\n"
        "    {{- eos_token + bos_token }}" + extra_bos + "{{- text + eos_token }}\n"
        "  {%- endif %}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "  {%- if messages[-1]['role'] != 'user' %}"
        "{{ raise_exception('the last message must be a user message to add a generation prompt') }}{% endif %}\n"
        "  {{- eos_token + bos_token }}\n"
        "{%- endif %}\n"
    )


# Characters Jinja's ``trim`` (Python's ``str.strip``) removes, grouped by their UTF-8 length: the Go
# template strips the same ones, byte by byte.
STRIP_CHARS = {n: [c for c in map(chr, range(0x3001)) if c.isspace() and len(c.encode()) == n] for n in (1, 2, 3)}


GO_ESCAPES = {"\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r"}


def _go_str(text: str) -> str:
    """``text`` as a Go string literal in printable ASCII (ollama's Modelfile parser drops other control
    characters, and a template must not hold three double quotes in a row)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char in GO_ESCAPES:
            out.append(GO_ESCAPES[char])
        elif " " <= char <= "~":
            out.append(char)
        elif ord(char) < 0x10000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def _go_starts(n: int, at_end: bool = False) -> str:
    """A Go condition: the string ``.`` starts (``at_end``: ends) with one of the ``n``-byte strip characters."""
    part = f"(slice . (len (slice . {n})))" if at_end else f"(slice . 0 {n})"
    return f"and (ge (len .) {n}) (eq {part} {' '.join(_go_str(c) for c in STRIP_CHARS[n])})"


def _go_fail(message: str) -> str:
    """A Go action that stops the rendering with ``message`` in its error (a template cannot raise;
    slicing a string past its end fails, and Go quotes the action, message and all)."""
    return "{{ slice " + _go_str(message) + f" 0 {len(message.encode()) + 1}" + " }}"


def ollama_template(layout: str) -> str:
    """The recipe's prompt as a Go template for an ollama Modelfile: the same layout as ``chat_template``.

    ollama renders ``.Messages`` (each ``.Role``, ``.Content``) and its runner tokenizes the text
    with a bos added in front (the GGUF's ``add_bos_token``) and special tokens parsed (see
    docs/local-models.md), so this template leaves out the very first ``<s>`` that the Jinja
    template writes; everything after it is the same text: ``INSTRUCTION ### Input: CONTEXT``
    split at the first mark and both parts stripped as Jinja's ``trim`` does, earlier turns as
    completed samples, the generation prompt ``</s><s>`` after a last user message. A system or
    other role, or roles out of order, stop the rendering with an error naming the rule.

    Go's ``text/template`` has no string search and ollama adds no such function, so the
    splitting and stripping are small recursive templates over byte slices (``oa.*``); Go allows
    100000 nested calls, which bounds a message to about that many bytes.
    """
    bos = sample_bos(layout)
    mark = _go_str(INPUT_MARK)
    n_mark = len(INPUT_MARK.encode())
    skips = "".join(
        f"\n{{{{- else if {_go_starts(n)} }}}}{{{{ template \"{{name}}\" (slice . {n}) }}}}" for n in (1, 2, 3))
    at_mark = f"and (ge (len .) {n_mark}) (eq (slice . 0 {n_mark}) {mark})"
    return "".join([
        "{{- /* OpenAlpaca, layout " + layout + ": a user message is INSTRUCTION, or INSTRUCTION "
        + INPUT_MARK + " CONTEXT. Generated by model/hf_tokenizer.py (ollama_template). */ -}}\n",
        # oa.input: the input block of a message, from its first mark on
        '{{- define "oa.input" }}\n{{- if lt (len .) ' + str(n_mark) + " }}\n{{- else if " + at_mark
        + ' }}{{ template "oa.context" (slice . ' + str(n_mark) + ") }}\n"
        '{{- else }}{{ template "oa.input" (slice . 1) }}\n{{- end }}\n{{- end }}\n',
        # oa.context: the text after the mark, left-stripped; nothing left means no input
        '{{- define "oa.context" }}\n{{- if eq . "" }}' + skips.replace("{name}", "oa.context")
        + "\n{{- else }}{{ " + _go_str(INPUT_OPEN) + ' }}{{ template "oa.rstrip" . }}{{ ' + _go_str(INPUT_CLOSE)
        + " }}\n{{- end }}\n{{- end }}\n",
        # oa.rstrip: the text without its trailing strip characters
        '{{- define "oa.rstrip" }}'
        + "".join(f'\n{{{{- {"if" if n == 1 else "else if"} {_go_starts(n, at_end=True)} }}}}'
                  f'{{{{ template "oa.rstrip" (slice . 0 (len (slice . {n}))) }}}}' for n in (1, 2, 3))
        + "\n{{- else }}{{ . }}\n{{- end }}\n{{- end }}\n",
        # oa.instruction: the text before the first mark, stripped (leading characters skipped here)
        '{{- define "oa.instruction" }}\n{{- if or (eq . "") (' + at_mark + ") }}"
        + skips.replace("{name}", "oa.instruction")
        + '\n{{- else }}{{ template "oa.body" . }}\n{{- end }}\n{{- end }}\n',
        # oa.body: byte by byte up to the mark; a strip character is written only when text follows it
        '{{- define "oa.body" }}\n{{- if or (eq . "") (' + at_mark + ") }}"
        + "".join(f"\n{{{{- else if {_go_starts(n)} }}}}"
                  f'{{{{ template "oa.keep" (printf "{n}%s" .) }}}}{{{{ template "oa.body" (slice . {n}) }}}}'
                  for n in (1, 2, 3))
        + '\n{{- else }}{{ slice . 0 1 }}{{ template "oa.body" (slice . 1) }}\n{{- end }}\n{{- end }}\n',
        # oa.keep: "N" + a strip character of N bytes + what follows it: write the character when the run
        # of strip characters it starts is followed by text before the mark or the end
        '{{- define "oa.keep" }}\n{{- $n := 2 }}{{ if eq (slice . 0 1) "2" }}{{ $n = 3 }}'
        '{{ else if eq (slice . 0 1) "3" }}{{ $n = 4 }}{{ end }}\n'
        "{{- $head := slice . 0 $n }}{{ $rest := slice . $n }}\n"
        "{{- with $rest }}{{ if " + at_mark + " }}"
        + "".join(f'{{{{ else if {_go_starts(n)} }}}}{{{{ template "oa.keep" (printf "%s%s" $head (slice . {n})) }}}}'
                  for n in (1, 2, 3))
        + "{{ else }}{{ slice $head 1 }}{{ end }}{{ end }}\n{{- end }}\n",
        # oa.prompt: the prompt of one user message
        '{{- define "oa.prompt" }}{{ template "oa.input" . }}{{ ' + _go_str(INSTRUCTION_OPEN)
        + ' }}{{ template "oa.instruction" . }}{{ ' + _go_str(INSTRUCTION_CLOSE) + " }}{{ end }}\n",
        '{{- $last := "assistant" }}\n',
        "{{- range $i, $m := .Messages }}\n",
        '{{- if not (eq $m.Role "user" "assistant") }}'
        + _go_fail("only user and assistant messages are supported; give a context as INSTRUCTION "
                   + INPUT_MARK + " CONTEXT") + "{{ end }}\n",
        "{{- if eq $m.Role $last }}"
        + _go_fail("messages must alternate user, assistant, user, ... starting with user") + "{{ end }}\n",
        "{{- $last = $m.Role }}\n",
        '{{- if eq $m.Role "user" }}{{ if $i }}{{ "<s>" }}{{ end }}' + '{{ "<s>" }}' * (bos - 1)
        + '{{ template "oa.prompt" $m.Content }}\n',
        '{{- else }}{{ "</s><s>' + "<s>" * (bos - 1) + '" }}{{ $m.Content }}{{ "</s>" }}{{ end }}\n',
        "{{- end }}\n",
        '{{- if eq $last "user" }}{{ "</s><s>" }}{{ end }}',
    ])


GENERIC_CLASS = "TokenizersBackend"  # AutoTokenizer loads tokenizer.json as it is only for a generic class
SPECIAL_TOKENS_MAP = {"bos_token": SPECIAL_PIECES[BOS_ID], "eos_token": SPECIAL_PIECES[EOS_ID],
                      "unk_token": SPECIAL_PIECES[0], "pad_token": SPECIAL_PIECES[PAD_ID]}


def tokenizer_config(layout: str, model_max_length: int = MODEL_MAX_LENGTH) -> dict:
    return {
        "tokenizer_class": GENERIC_CLASS,
        **SPECIAL_TOKENS_MAP,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": chat_template(layout),
    }


def has_exact_tokenizer(folder: str | Path) -> bool:
    """The folder holds a ``tokenizer.json`` written here: its config names the generic class,
    so ``AutoTokenizer`` loads the file as it is."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return False
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class") == GENERIC_CLASS
    except (OSError, ValueError):
        return False


def _model_max_length(folder: Path) -> int:
    """The context of the folder's config.json (``max_position_embeddings``), else OpenLLaMA's."""
    try:
        return int(json.loads((folder / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return MODEL_MAX_LENGTH


def write_hf_tokenizer(folder: str | Path, layout: str, out_dir: str | Path | None = None) -> list[str]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (with the layout's chat template) and
    ``special_tokens_map.json`` for ``folder/tokenizer.model`` into ``out_dir`` (default: the
    folder itself; ``tokenizer.model`` is copied there too). Each file goes to a temp name first
    and is renamed, so a reader never sees half a file. Returns the names written.
    """
    folder = Path(folder)
    out = Path(out_dir) if out_dir is not None else folder
    model_file = folder / SP_MODEL
    if not model_file.is_file():
        raise ModelPathError(f"{folder}: no {SP_MODEL} to build the tokenizer from")
    tokenizer = build_tokenizer(model_file)
    files = {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config(layout, _model_max_length(folder)), indent=2) + "\n",
        "special_tokens_map.json": json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n",
    }
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != folder.resolve():
        files[SP_MODEL] = model_file.read_bytes()
    for name, content in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(content if isinstance(content, bytes) else content.encode())
        tmp.replace(out / name)
    stale = out / "chat_template.jinja"  # transformers prefers it over tokenizer_config's template
    if stale.is_file():
        stale.unlink()
    return list(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="exact_tokenizer.sh",
        description="Add an exact tokenizer.json and the recipe's chat template to a model folder with a "
        "tokenizer.model (a downloaded OpenLLaMA, say), so AutoTokenizer, lm-eval, vLLM and transformers serve "
        "give sentencepiece's ids.")
    parser.add_argument("folder", help="model folder holding tokenizer.model")
    parser.add_argument("--layout", choices=LAYOUTS, default="original",
                        help="prompt layout of the chat template (default original, the default recipe's)")
    parser.add_argument("--out_dir", default=None,
                        help="write a tokenizer folder here instead of into FOLDER (tokenizer.model is copied)")
    args = parser.parse_args(argv)
    try:
        written = write_hf_tokenizer(args.folder, args.layout, args.out_dir)
    except ModelPathError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(written)} to {args.out_dir or args.folder} (layout {args.layout})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
