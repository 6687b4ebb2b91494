"""The training ids on llama.cpp: sentencepiece, from the bytes a GGUF carries, as llama-cpp-python's tokenizer.

llama.cpp's own tokenizer for LLaMA models (vocab type SPM) applies no sentencepiece normaliser: no
NFKC map and no folding of runs of spaces (ggml-org/llama.cpp#2023). On an OpenLLaMA-v1-like
tokenizer it gives other ids than training on newlines, tabs, runs of spaces and NFKC text, both
prompt templates among them. ``scripts/export_gguf.sh`` therefore embeds the model's
``tokenizer.model`` in the GGUF (``model.gguf.KEY_SP_MODEL``), and the project's GGUF engine
tokenizes with sentencepiece itself, as training did:

* ``tokenize(text, special=True)`` splits the text on the control pieces (``<s>``, ``</s>``) and
  encodes each piece between them with ``SentencePieceProcessor.encode``. A rendered chat template
  ``<s>P</s><s>`` thus becomes ``[1] + sp.encode(P) + [2, 1]``, exactly how training builds
  ``[1, P, 2, 1]`` (``openalpaca.prompts``); ``special=False`` encodes the whole text (a literal
  ``<s>`` is text, as sentencepiece reads it). ``add_bos`` puts the bos in front when the GGUF asks
  for it (``tokenizer.ggml.add_bos_token``), as llama.cpp does.
* ``detokenize`` renders each id to bytes from the same model (byte pieces as their byte, ``▁`` as
  a space, control pieces only with ``special``) and drops the dummy-prefix space of the first piece
  after the start or after a control token: the inverse of the per-piece encoding above, and
  ``SentencePieceProcessor.decode``'s text for ids without control tokens. Bytes, not text, so a
  character split over byte-fallback ids streams correctly (llama-cpp-python joins the bytes).
  With ``prev_tokens`` only their last id matters (does the run start here?), so streaming
  concatenates to the same text as decoding at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llama_cpp.llama_tokenizer import BaseLlamaTokenizer

SPACE = "▁"  # sentencepiece's whitespace symbol
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class SentencePieceGGUFTokenizer(BaseLlamaTokenizer):
    """llama-cpp-python's tokenizer interface over a ``tokenizer.model`` (its bytes)."""

    def __init__(self, model_proto: bytes, add_bos: bool = True):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_proto)
        self.add_bos = add_bos
        self.bos_id = self.sp.bos_id()
        spec = proto.normalizer_spec
        strips_prefix = spec.add_dummy_prefix or spec.remove_extra_whitespaces  # as sentencepiece's decoder
        unk_surface = proto.trainer_spec.unk_surface.encode()
        self.controls = {self.sp.id_to_piece(i): i for i in range(len(self.sp)) if self.sp.is_control(i)}
        self._special = re.compile("(" + "|".join(map(re.escape, sorted(self.controls, key=len, reverse=True))) + ")")
        # bytes of each id in the middle of a run, and as the first piece of a run
        self._mid: list[bytes] = []
        self._first: list[bytes] = []
        for i in range(len(self.sp)):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_control(i):
                mid = first = b""
            elif self.sp.is_unknown(i):
                mid = first = unk_surface
            elif self.sp.is_byte(i) and (match := BYTE_PIECE.fullmatch(piece)):
                mid = first = bytes([int(match.group(1), 16)])
            else:
                mid = piece.replace(SPACE, " ").encode()
                first = piece.removeprefix(SPACE).replace(SPACE, " ").encode() if strips_prefix else mid
            self._mid.append(mid)
            self._first.append(first)

    def __len__(self) -> int:
        return len(self.sp)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        string = text.decode("utf-8", errors="ignore")
        ids = [self.bos_id] if add_bos and self.add_bos else []
        if not special:
            return ids + self.sp.encode(string)
        for piece in self._special.split(string):
            if piece in self.controls:
                ids.append(self.controls[piece])
            elif piece:
                ids += self.sp.encode(piece)
        return ids

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes:
        run_start = not prev_tokens or self.sp.is_control(int(prev_tokens[-1]))
        out = bytearray()
        for token in tokens:
            token = int(token)
            if not 0 <= token < len(self._mid):
                continue  # an id outside the vocabulary (a padded embedding row) has no text
            if self.sp.is_control(token):
                out += self.sp.id_to_piece(token).encode() if special else b""
                run_start = True
                continue
            out += self._first[token] if run_start else self._mid[token]
            run_start = False
        return bytes(out)

    # the helpers llama-cpp-python's own tokenizer offers
    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")
