"""Tests for process_dataset.py: mapping, the word limit, input formats, bad input, shadowing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import process_dataset  # noqa: E402  (the script lives at the repo root, not in a package)
from process_dataset import DataError, read_dolly, to_alpaca, write_json_atomic  # noqa: E402

SAMPLE = REPO / "datasets" / "sample_dolly.jsonl"

RECORDS = [
    {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
    {
        "instruction": "Where is the café?",
        "context": "The café sits beside the old mill.",
        "response": "Beside the old mill.",
        "category": "closed_qa",
    },
    {"instruction": "Shorten this.", "context": "A  long\ttext\nhere.", "response": "Text.",
     "category": "summarization", "extra": 1},
]
EXPECTED = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {
        "instruction": "Where is the café?",
        "input": "The café sits beside the old mill.",
        "output": "Beside the old mill.",
    },
    {"instruction": "Shorten this.", "input": "A  long\ttext\nhere.", "output": "Text."},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), "utf-8")
    return path


def write_parquet(path: Path, records: list) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "process_dataset.py", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )


def words(n: int, word: str = "w") -> str:
    return " ".join([word] * n)


# --- mapping -------------------------------------------------------------------------------


def test_to_alpaca_renames_drops_category_and_keeps_order():
    kept, dropped = to_alpaca(RECORDS, 2000)
    assert kept == EXPECTED
    assert dropped == 0


def test_written_file_keeps_non_ascii_and_uses_indent_4(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.json"
    assert process_dataset.main(["--input", str(src), "--output", str(out)]) == 0
    text = out.read_bytes().decode("utf-8")
    assert "café" in text and "\\u00e9" not in text
    assert text == json.dumps(EXPECTED, indent=4, ensure_ascii=False) + "\n"
    assert text.startswith('[\n    {\n        "instruction": ')
    assert capsys.readouterr().out.strip() == (
        f"read 3 records from {src}; kept 3, dropped 0 longer than 2000 words; wrote {out}"
    )


# --- the word limit ------------------------------------------------------------------------


def boundary_records() -> list[dict]:
    exact = {"instruction": words(700), "context": words(650), "response": words(650)}
    over = {"instruction": words(700), "context": words(651), "response": words(650)}
    # tabs and newlines separate words too; 2000 in total across the three fields
    spaced = {"instruction": "a\tb\nc", "context": words(1000), "response": words(997)}
    return [
        {**exact, "category": "open_qa"},
        {**over, "category": "open_qa"},
        {**spaced, "category": "open_qa"},
    ]


def test_limit_is_inclusive_at_2000_words():
    kept, dropped = to_alpaca(boundary_records(), 2000)
    assert [r["input"] for r in kept] == [words(650), words(1000)]
    assert dropped == 1


def test_max_words_flag(tmp_path, capsys):
    records = [
        {"instruction": "one two", "context": "three", "response": "four five", "category": "x"},
        {"instruction": "one two", "context": "three", "response": "four five six", "category": "x"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.json"
    assert process_dataset.main(["--input", str(src), "--output", str(out), "--max_words", "5"]) == 0
    assert [r["output"] for r in json.loads(out.read_text("utf-8"))] == ["four five"]
    assert "kept 1, dropped 1 longer than 5 words" in capsys.readouterr().out


def test_default_limit_via_script(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", boundary_records())
    out = tmp_path / "out.json"
    result = run_script("--input", src, "--output", out)
    assert result.returncode == 0, result.stderr
    assert "read 3 records" in result.stdout
    assert "kept 2, dropped 1 longer than 2000 words" in result.stdout
    assert len(json.loads(out.read_text("utf-8"))) == 2


# --- input formats -------------------------------------------------------------------------


@pytest.mark.parametrize("writer, suffix", [
    (write_jsonl, ".jsonl"), (write_json, ".json"), (write_parquet, ".parquet"),
])
def test_formats_give_same_output(tmp_path, writer, suffix, capsys):
    # parquet needs the same keys in every row, so the extra key is left out of the shared input
    records = [{k: r[k] for k in ("instruction", "context", "response", "category")} for r in RECORDS]
    src = writer(tmp_path / f"in{suffix}", records)
    assert read_dolly(src) == records
    out = tmp_path / "out.json"
    assert process_dataset.main(["--input", str(src), "--output", str(out)]) == 0
    assert out.read_text("utf-8") == json.dumps(EXPECTED, indent=4, ensure_ascii=False) + "\n"


def test_sample_file_converts_via_script(tmp_path):
    lines = SAMPLE.read_text("utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) >= 10
    assert all(set(r) == {"instruction", "context", "response", "category"} for r in records)
    assert any(r["context"] for r in records) and any(not r["context"] for r in records)
    assert any("é" in r["instruction"] + r["context"] + r["response"] for r in records)

    out = tmp_path / "sample.json"
    result = run_script("--input", "datasets/sample_dolly.jsonl", "--output", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    n = len(records)
    assert result.stdout == (
        f"read {n} records from datasets/sample_dolly.jsonl; kept {n}, "
        f"dropped 0 longer than 2000 words; wrote {out}\n"
    )
    written = json.loads(out.read_text("utf-8"))
    assert [r["instruction"] for r in written] == [r["instruction"] for r in records]
    assert "é" in out.read_text("utf-8")

    counts = [sum(len(r[k].split()) for k in ("instruction", "context", "response")) for r in records]
    limit = sorted(counts)[n // 2]
    result = run_script("--input", SAMPLE, "--output", out, "--max_words", limit)
    kept = sum(c <= limit for c in counts)
    assert f"kept {kept}, dropped {n - kept} longer than {limit} words" in result.stdout


def test_write_json_atomic_replaces_and_leaves_no_temp(tmp_path):
    out = tmp_path / "x.json"
    out.write_text("old", "utf-8")
    write_json_atomic({"a": ["é"]}, out)
    assert out.read_text("utf-8") == '{\n    "a": [\n        "é"\n    ]\n}\n'
    assert os.listdir(tmp_path) == ["x.json"]


def test_write_json_atomic_failure_keeps_old_file(tmp_path):
    out = tmp_path / "x.json"
    out.write_text("old", "utf-8")
    with pytest.raises(TypeError):
        write_json_atomic({"a": object()}, out)
    assert out.read_text("utf-8") == "old"
    assert os.listdir(tmp_path) == ["x.json"]


# --- the Hugging Face hub path (faked: the hub cannot be reached from the tests) ------------


def fake_datasets(monkeypatch, load_dataset) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_path_loads_train_split(tmp_path, monkeypatch, capsys):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return types.SimpleNamespace(to_list=lambda: list(RECORDS))

    fake_datasets(monkeypatch, load_dataset)
    monkeypatch.chdir(tmp_path)
    assert process_dataset.main([]) == 0
    assert calls == [("databricks/databricks-dolly-15k", "train")]
    assert json.loads((tmp_path / "openalpaca.json").read_text("utf-8")) == EXPECTED
    assert "from databricks/databricks-dolly-15k;" in capsys.readouterr().out


def test_hub_failure_suggests_input(tmp_path, monkeypatch, capsys):
    def load_dataset(name, split):
        raise ConnectionError("no route to host\nmore detail")

    fake_datasets(monkeypatch, load_dataset)
    monkeypatch.chdir(tmp_path)
    assert process_dataset.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no route to host" in err and "--input" in err
    assert not (tmp_path / "openalpaca.json").exists()


# --- bad input -----------------------------------------------------------------------------

GOOD = {"instruction": "i", "context": "c", "response": "r", "category": "open_qa"}


def jsonl_bytes(*lines) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                    for line in lines)


def parquet_writer(columns: dict):
    return lambda path: pq.write_table(pa.table(columns), path)


def without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


# (input file name, content: bytes, a callable writing the file, or None for no file,
#  substrings the one-line message must contain besides the input path)
BAD_INPUTS = [
    pytest.param("a.jsonl", jsonl_bytes(GOOD, b'{"instruction": "x",'), ["line 2", "malformed JSON"],
                 id="jsonl-malformed"),
    pytest.param("a.json", b'[\n{"instruction": "x"\n', ["line 3", "malformed JSON"],
                 id="json-malformed"),
    pytest.param("a.jsonl", jsonl_bytes(GOOD, without("context")), ["line 2", "'context'", "missing"],
                 id="jsonl-missing-field"),
    pytest.param("a.json", json.dumps([GOOD, GOOD, without("response")]).encode(),
                 ["record 3", "'response'", "missing"], id="json-missing-field"),
    pytest.param("a.parquet", parquet_writer({"context": ["c"], "response": ["r"]}),
                 ["record 1", "'instruction'", "missing"], id="parquet-missing-column"),
    pytest.param("a.jsonl", jsonl_bytes({**GOOD, "response": 5}), ["line 1", "'response'", "number"],
                 id="jsonl-number"),
    pytest.param("a.jsonl", jsonl_bytes(GOOD, GOOD, {**GOOD, "context": None}),
                 ["line 3", "'context'", "null"], id="jsonl-null"),
    pytest.param("a.jsonl", jsonl_bytes(GOOD, {**GOOD, "instruction": ["x"]}),
                 ["line 2", "'instruction'", "list"], id="jsonl-list"),
    pytest.param("a.json", json.dumps([GOOD, {**GOOD, "context": None}]).encode(),
                 ["record 2", "'context'", "null"], id="json-null"),
    pytest.param("a.parquet", parquet_writer({"instruction": ["i", "j"], "context": ["c", None],
                                              "response": ["r", "s"]}),
                 ["record 2", "'context'", "null"], id="parquet-null"),
    pytest.param("a.parquet", parquet_writer({"instruction": ["i"], "context": ["c"], "response": [7]}),
                 ["record 1", "'response'", "number"], id="parquet-number"),
    pytest.param("a.jsonl", jsonl_bytes(GOOD, b'{"instruction": "caf\xe9"}'), ["line 2", "UTF-8", "0xe9"],
                 id="jsonl-not-utf8"),
    pytest.param("a.json", b'[\n{"instruction": "\xff"}]', ["line 2", "UTF-8"], id="json-not-utf8"),
    pytest.param("a.jsonl", b"", ["empty"], id="jsonl-empty"),
    pytest.param("a.json", b"", ["empty"], id="json-empty"),
    pytest.param("a.jsonl", b"\n  \n", ["no records"], id="jsonl-blank-lines"),
    pytest.param("a.json", b"[]", ["no records"], id="json-empty-list"),
    pytest.param("a.parquet", parquet_writer({"instruction": pa.array([], pa.string()),
                                              "context": pa.array([], pa.string()),
                                              "response": pa.array([], pa.string())}),
                 ["no records"], id="parquet-no-rows"),
    pytest.param("a.json", json.dumps({"data": [GOOD]}).encode(), ["list of objects", "object"],
                 id="json-top-level-object"),
    pytest.param("a.json", json.dumps([GOOD, 3]).encode(), ["record 2", "expected a JSON object"],
                 id="json-list-of-non-objects"),
    pytest.param("a.jsonl", jsonl_bytes(GOOD, [GOOD]), ["line 2", "expected a JSON object"],
                 id="jsonl-line-not-object"),
    pytest.param("a.parquet", b"not parquet at all", ["not a readable parquet file"],
                 id="parquet-corrupt"),
    pytest.param("a.csv", b"instruction,context,response\n", ["unsupported file type"],
                 id="unsupported-suffix"),
    pytest.param("missing.jsonl", None, ["no such file"], id="missing-file"),
]


def assert_one_clean_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("name, content, expected", BAD_INPUTS)
def test_bad_input_gives_one_clean_error(tmp_path, name, content, expected):
    src = tmp_path / name
    if isinstance(content, bytes):
        src.write_bytes(content)
    elif content is not None:
        content(src)
    out = tmp_path / "out.json"
    out.write_bytes(b'["previous run"]\n')
    before = sorted(os.listdir(tmp_path))

    result = run_script("--input", src, "--output", out)

    assert_one_clean_error(result, str(src), *expected)
    assert out.read_bytes() == b'["previous run"]\n'
    assert sorted(os.listdir(tmp_path)) == before


def parent_missing(tmp: Path) -> Path:
    return tmp / "nowhere" / "out.json"


def parent_is_a_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "out.json"


def output_is_a_dir(tmp: Path) -> Path:
    (tmp / "sub").mkdir()
    return tmp / "sub"


@pytest.mark.parametrize("make_output, expected", [
    (parent_missing, "does not exist"),
    (parent_is_a_file, "is not a directory"),
    (output_is_a_dir, "is a directory"),
])
def test_bad_output_path(tmp_path, make_output, expected):
    out = make_output(tmp_path)
    before = sorted(os.listdir(tmp_path))
    result = run_script("--input", SAMPLE, "--output", out)
    assert_one_clean_error(result, str(out), expected)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory modes")
def test_output_dir_not_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run_script("--input", SAMPLE, "--output", locked / "out.json")
    finally:
        locked.chmod(0o700)
    assert_one_clean_error(result, str(locked / "out.json"), "not writable")
    assert os.listdir(locked) == []


def test_read_dolly_raises_data_error(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, "response": 1.5}])
    with pytest.raises(DataError, match=r"line 2: field 'response' must be a string, got number"):
        read_dolly(src)
