"""Reading and writing record files, with errors a user can act on.

One reader for every JSON/JSONL/parquet file the project takes (dolly files, Alpaca training
data, inference questions): a problem is reported as one line naming the file, the line or
1-based record, and the field. Outputs are written to a temporary file and renamed, so a failed
run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any


class DataError(Exception):
    """Bad input or an unusable output path; the message is shown to the user as is."""


def type_name(value: Any) -> str:
    """The JSON name of a value's type, which is what a user sees in their file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {list: "list", dict: "object"}.get(type(value), type(value).__name__)


def check_record(record: Any, where: str, fields: Sequence[str], optional: Sequence[str] = ()) -> dict:
    """Return ``record`` if it is an object whose ``fields`` are strings.

    ``optional`` fields may be missing (they read as ""), but must be strings when present.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type_name(record)}")
    for field in optional:
        record.setdefault(field, "")
    for field in (*fields, *optional):
        if field not in record:
            raise DataError(f"{where}: missing field '{field}'")
        if not isinstance(record[field], str):
            raise DataError(
                f"{where}: field '{field}' must be a string, got {type_name(record[field])}"
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


def _read_jsonl(path: Path, check: Callable[[Any, str], dict]) -> list[dict]:
    records = []
    # split on "\n" only: str.splitlines() would also split on U+2028, which JSON allows in strings
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: malformed JSON ({exc.msg})") from None
        records.append(check(record, f"{path}: line {number}"))
    return records


def _read_json(path: Path, check: Callable[[Any, str], dict]) -> list[dict]:
    text = _read_text(path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: top level must be a list of objects, got {type_name(data)}")
    return [check(r, f"{path}: record {i}") for i, r in enumerate(data, start=1)]


def _read_parquet(path: Path, check: Callable[[Any, str], dict]) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    return [check(r, f"{path}: record {i}") for i, r in enumerate(rows, start=1)]


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def read_located(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """Every record of a local file (``.jsonl``, ``.json`` list or ``.parquet``), unchecked, with
    where it is (``"FILE: line N"`` or ``"FILE: record N"``), for a caller's own checks."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(READERS)})")
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        located = reader(path, lambda record, where: (where, record))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not located:
        raise DataError(f"{path}: no records found")
    return located


def read_records(path: str | os.PathLike, fields: Sequence[str], optional: Sequence[str] = ()) -> list[dict]:
    """Read and validate a local file of records (``.jsonl``, ``.json`` list or ``.parquet``).

    Every record must be an object whose ``fields`` are strings (see ``check_record``); other
    keys are kept. Errors name the file, the line (JSONL) or 1-based record, and the field.
    """
    return [check_record(record, where, fields, optional) for where, record in read_located(path)]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[str]]:
    """A text file that replaces ``path`` only when the block completes; on error nothing changes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as UTF-8 JSON (indent 4, non-ASCII kept) to ``path`` atomically.

    Raises ``OSError`` on failure; ``path`` is then left as it was and no temp file remains.
    """
    with atomic_write(path) as f:
        json.dump(obj, f, indent=4, ensure_ascii=False)
        f.write("\n")


def check_save_path(path: str | Path) -> None:
    """Fail before any work when the trainer's ``save_path`` cannot be made or written.

    Every part of the path that exists must be a folder, and the deepest existing one writable
    (nothing is created here).
    """
    path = Path(path)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise DataError(f"{path}: save path cannot be made, {existing} is not a directory")
    if existing == path and not path.is_dir():
        raise DataError(f"{path}: save path is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{path}: save path is not writable ({existing})")


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
