"""Turn databricks-dolly-15k into the Alpaca-format ``openalpaca.json``.

Each dolly record ``{instruction, context, response, category}`` becomes
``{instruction, input, output}`` (``category`` and any other key are dropped), input order
is kept, and a record is kept when its three fields hold at most ``--max_words``
whitespace-separated words in total (the original rule: exactly ``max_words`` is kept).

    python process_dataset.py                                  # from the Hugging Face hub
    python process_dataset.py --input datasets/sample_dolly.jsonl --output sample.json

Bad input is reported as one line on stderr (file, line or record, field) with exit code 1,
and nothing is written: the whole input is validated first and the output is replaced
atomically, so an existing output file is never left half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HF_DATASET = "databricks/databricks-dolly-15k"
DOLLY_FIELDS = ("instruction", "context", "response")
ALPACA_FIELDS = {"instruction": "instruction", "context": "input", "response": "output"}


class DataError(Exception):
    """Bad input or an unusable output path; the message is shown to the user as is."""


def _type_name(value: Any) -> str:
    """The JSON name of a value's type, which is what a user sees in their file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {list: "list", dict: "object"}.get(type(value), type(value).__name__)


def check_record(record: Any, where: str) -> dict:
    """Return ``record`` if it is an object with the three dolly fields as strings."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
    for field in DOLLY_FIELDS:
        if field not in record:
            raise DataError(f"{where}: missing field '{field}'")
        if not isinstance(record[field], str):
            raise DataError(
                f"{where}: field '{field}' must be a string, got {_type_name(record[field])}"
            )
    return record


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start]
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{bad:02x} at file offset {exc.start})"
        ) from None


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    # split on "\n" only: str.splitlines() would also split on U+2028, which JSON allows in strings
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: malformed JSON ({exc.msg})") from None
        records.append(check_record(record, f"{path}: line {number}"))
    return records


def _read_json(path: Path) -> list[dict]:
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: top level must be a list of objects, got {_type_name(data)}")
    return [check_record(r, f"{path}: record {i}") for i, r in enumerate(data, start=1)]


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    return [check_record(r, f"{path}: record {i}") for i, r in enumerate(rows, start=1)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def read_dolly(path: str | os.PathLike) -> list[dict]:
    """Read and validate a local dolly-format file (``.jsonl``, ``.json`` list or ``.parquet``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(READERS)})")
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        records = reader(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not records:
        raise DataError(f"{path}: no records found")
    return records


def load_hf_dolly() -> list[dict]:
    """Download databricks-dolly-15k from the Hugging Face hub and validate it."""
    try:
        from datasets import load_dataset

        rows = load_dataset(HF_DATASET, split="train").to_list()
    except Exception as exc:  # network, auth and cache failures raise many unrelated types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load {HF_DATASET} from the Hugging Face hub ({reason}); "
            "download it and pass --input FILE (.jsonl, .json or .parquet)"
        ) from None
    return [check_record(r, f"{HF_DATASET}: record {i}") for i, r in enumerate(rows, start=1)]


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


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as UTF-8 JSON (indent 4) to ``path`` via a temp file and ``os.replace``.

    Raises ``OSError`` on failure; ``path`` is then left as it was and no temp file remains.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=4, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_output(path: Path) -> None:
    """Fail before any work when ``path`` cannot possibly be written."""
    directory = path.parent
    if not directory.exists():
        raise DataError(f"{path}: output directory {directory} does not exist")
    if not directory.is_dir():
        raise DataError(f"{path}: output directory {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise DataError(f"{path}: output directory {directory} is not writable")
    if path.is_dir():
        raise DataError(f"{path}: output path is a directory")


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
        records = read_dolly(args.input) if args.input else load_hf_dolly()
        kept, dropped = to_alpaca(records, args.max_words)
        try:
            write_json_atomic(kept, args.output)
        except OSError as exc:
            raise DataError(f"{args.output}: cannot write ({exc.strerror or exc})") from None
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    source = args.input or HF_DATASET
    print(
        f"read {len(records)} records from {source}; kept {len(kept)}, "
        f"dropped {dropped} longer than {args.max_words} words; wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
