"""Reading Alpaca records and planning epochs across ranks."""

import json

import pytest

from openalpaca.data import PAD_SLOT, SFTDataset, plan_epoch, read_alpaca
from openalpaca.records import DataError
from tests.conftest import make_records


@pytest.mark.parametrize("world_size, micro", [(1, 1), (2, 1), (2, 3), (8, 1)])
def test_every_sample_once_per_epoch_and_equal_microsteps(world_size, micro):
    n, batch = 103, 24
    plans = [plan_epoch(n, 1, 7, batch, micro, world_size, r) for r in range(world_size)]
    seen = [i for plan in plans for step in plan for mb in step for i in mb if i != PAD_SLOT]
    assert sorted(seen) == list(range(n))
    assert len({len(p) for p in plans}) == 1 and len(plans[0]) == 5  # ceil(103 / 24)
    assert {len(step) for p in plans for step in p} == {batch // (micro * world_size)}


def test_plan_depends_only_on_seed_and_epoch():
    assert plan_epoch(50, 3, 1, 8, 1, 2, 0) == plan_epoch(50, 3, 1, 8, 1, 2, 0)
    assert plan_epoch(50, 3, 1, 8, 1, 2, 0) != plan_epoch(50, 4, 1, 8, 1, 2, 0)
    assert plan_epoch(50, 3, 1, 8, 1, 2, 0) != plan_epoch(50, 3, 2, 8, 1, 2, 0)


def test_dataset_skips_records_with_no_room(tokenizer):
    records = make_records(6) + [{"instruction": "Repeat the words. " * 50, "input": "", "output": "x"}]
    ds = SFTDataset.from_records(records, tokenizer, max_length=200)
    assert ds.num_skipped == 1 and len(ds) == 6 and ds.ids == list(range(6))


def test_read_records_json_and_jsonl(tmp_path):
    records = make_records(5)
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert read_alpaca(tmp_path / "a.json") == read_alpaca(tmp_path / "a.jsonl") == records


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "file is empty"),
        (b"[]", "no records found"),
        (b'{"instruction": "a",\n "input": "", "output": "b"}', "top level must be a list of objects, got object"),
        (b'[{"instruction": "a", "input": "", "output": "b"}, 3]', "record 2: expected a JSON object"),
        (b'[{"instruction": "a", "input": ""}]', "record 1: missing field 'output'"),
        (b'[{"instruction": "a", "input": 1, "output": "b"}]', "record 1: field 'input' must be a string, got number"),
        (b'[{"instruction": "a", "input": "", "output": "b"},\n{"instr', "line 2: malformed JSON"),
        (b'[{"instruction": "caf\xe9", "input": "", "output": "b"}]', "line 1: not valid UTF-8"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_alpaca(path)
    assert str(path) in str(err.value)
