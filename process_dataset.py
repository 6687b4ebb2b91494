"""Turn databricks-dolly-15k into the Alpaca-format ``openalpaca.json``, or check and normalise conversations.

Each dolly record ``{instruction, context, response, category}`` becomes
``{instruction, input, output}`` (``category`` and any other key are dropped), input order
is kept, and a record is kept when its three fields hold at most ``--max_words``
whitespace-separated words in total (the original rule: exactly ``max_words`` is kept).

Conversations (OpenAI ``messages`` or ShareGPT ``conversations`` records, docs/conversations.md)
are checked as the trainer checks them and written as OpenAI ``messages`` records, each user
turn as ``INSTRUCTION ### Input: CONTEXT`` (what a chat client sends); a conversation is kept
when all its turns hold at most ``--max_words`` words.

    python process_dataset.py                                  # from the Hugging Face hub
    python process_dataset.py --input datasets/sample_dolly.jsonl --output sample.json
    python process_dataset.py --input chats.jsonl --output chats.json   # messages or ShareGPT

Bad input is reported as one line on stderr (file, line or record, field) with exit code 1,
and nothing is written: the whole input is validated first and the output is replaced
atomically, so an existing output file is never left half-written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from openalpaca.conversations import FORMAT_KEY, SYSTEM_MESSAGES, Conversation, as_messages, parse_conversations
from openalpaca.records import DataError, check_output, check_record, read_located, write_json_atomic

HF_DATASET = "databricks/databricks-dolly-15k"
DOLLY_FIELDS = ("instruction", "context", "response")
ALPACA_FIELDS = {"instruction": "instruction", "context": "input", "response": "output"}


def read_dolly(path: str | os.PathLike) -> list[dict]:
    """Read and validate a local dolly-format file (``.jsonl``, ``.json`` list or ``.parquet``)."""
    return read_input(path, "dolly", "refuse")[1]


def load_hf_dolly() -> list[dict]:
    """Download databricks-dolly-15k from the Hugging Face hub and validate it."""
    from datasets import load_dataset

    try:
        rows = load_dataset(HF_DATASET, split="train").to_list()
    except (OSError, ValueError) as exc:  # offline, not found, gated, HTTP errors (OSError); bad input (ValueError)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load {HF_DATASET} from the Hugging Face hub ({reason}); "
            "download it and pass --input FILE (.jsonl, .json or .parquet)"
        ) from None
    return [check_record(r, f"{HF_DATASET}: record {i}", DOLLY_FIELDS) for i, r in enumerate(rows, start=1)]


INPUT_FORMATS = ("auto", "dolly", "messages", "sharegpt")


def read_input(path: str | os.PathLike, name: str, system_message: str) -> tuple[str, list]:
    """The input file, read once: ``(its format, its records)``, dolly records checked or conversations.

    ``name`` is the format, or ``auto``: the first record's (dolly unless it has ``messages`` or
    ``conversations``, the keys ``openalpaca.conversations`` reads them by).
    """
    located = read_located(path)
    fmt, first = name, located[0][1]
    if fmt == "auto":
        fmt = next((f for f in ("messages", "sharegpt") if isinstance(first, dict) and FORMAT_KEY[f] in first), "dolly")
    if fmt == "dolly":
        return fmt, [check_record(record, where, DOLLY_FIELDS) for where, record in located]
    return fmt, parse_conversations(located, fmt, system_message)[1]


def conversation_words(conversation: Conversation) -> int:
    return sum(len(text.split()) for ex in conversation for text in (ex.instruction, ex.input, ex.output))


def to_messages(conversations: list[Conversation], max_words: int) -> tuple[list[dict], int]:
    """Conversations as OpenAI ``messages`` records; return (kept records, number dropped as too long)."""
    kept = [as_messages(c) for c in conversations if conversation_words(c) <= max_words]
    return kept, len(conversations) - len(kept)


def word_count(record: dict) -> int:
    return sum(len(record[field].split()) for field in DOLLY_FIELDS)


def to_alpaca(records: list[dict], max_words: int) -> tuple[list[dict], int]:
    """Map dolly records to Alpaca ones; return (kept records, number dropped as too long)."""
    kept = [
        {new: record[old] for old, new in ALPACA_FIELDS.items()}
        for record in records
        if word_count(record) <= max_words
    ]
    return kept, len(records) - len(kept)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        type=Path,
        metavar="FILE",
        help=f"local dolly-format file (.jsonl, .json list or .parquet); "
        f"default: download {HF_DATASET} from the Hugging Face hub",
    )
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        default=Path("openalpaca.json"),
        help="Alpaca-format JSON list to write (default: %(default)s)",
    )
    parser.add_argument(
        "--format",
        choices=INPUT_FORMATS,
        default="auto",
        help="format of --input: dolly (instruction, context, response), messages (OpenAI) or sharegpt; "
        "default: from the first record",
    )
    parser.add_argument(
        "--system_message",
        choices=SYSTEM_MESSAGES,
        default="refuse",
        help="a conversation's first-turn system message: refuse it (an error) or prepend it to the first "
        "instruction (default: %(default)s)",
    )
    parser.add_argument(
        "--max_words",
        type=positive_int,
        default=2000,
        metavar="N",
        help="drop records whose instruction + context + response exceed this many "
        "whitespace-separated words (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_output(args.output)
        if args.input:
            fmt, records = read_input(args.input, args.format, args.system_message)
        else:
            fmt, records = "dolly", load_hf_dolly()
        kept, dropped = to_alpaca(records, args.max_words) if fmt == "dolly" else to_messages(records, args.max_words)
        try:
            write_json_atomic(kept, args.output)
        except OSError as exc:
            raise DataError(f"{args.output}: cannot write ({exc.strerror or exc})") from None
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    source = args.input or HF_DATASET
    what = "records" if fmt == "dolly" else f"conversations ({fmt})"
    print(
        f"read {len(records)} {what} from {source}; kept {len(kept)}, "
        f"dropped {dropped} longer than {args.max_words} words; wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
