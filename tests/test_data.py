"""Reading Alpaca records and planning epochs across ranks."""

import json

import pytest

from openalpaca.data import PAD_SLOT, SFTDataset, epoch_of, rank_micro_batches, read_alpaca, step_slots, total_steps
from openalpaca.records import DataError
from tests.conftest import make_records


@pytest.mark.parametrize("world_size, micro", [(1, 1), (2, 1), (2, 3), (8, 1)])
def test_pad_tail_every_sample_once_per_epoch_and_equal_microsteps(world_size, micro):
    n, batch, epochs = 103, 24, 2
    assert total_steps(n, epochs, batch, "pad") == 10  # ceil(103 / 24) per epoch
    for epoch in range(epochs):
        steps = range(epoch * 5, epoch * 5 + 5)
        assert {epoch_of(s, n, batch, "pad") for s in steps} == {epoch}
        plans = [[rank_micro_batches(step_slots(n, s, 7, batch, "pad"), micro, world_size, r) for s in steps]
                 for r in range(world_size)]
        seen = [i for plan in plans for step in plan for mb in step for i in mb if i != PAD_SLOT]
        assert sorted(seen) == list(range(n))
        assert {len(step) for p in plans for step in p} == {batch // (micro * world_size)}


def test_carry_tail_runs_epochs_back_to_back_as_the_original():
    """The original's count: epochs * N // batch steps; the stream is epoch 0's shuffle, then
    epoch 1's, cut into batches; what is left after the last full batch is not used."""
    n, batch, epochs = 103, 24, 2
    assert total_steps(n, epochs, batch, "carry") == 206 // 24 == 8
    stream = [i for s in range(8) for i in step_slots(n, s, 7, batch, "carry")]
    order0, order1 = step_slots(n, 0, 7, 103, "pad"), step_slots(n, 1, 7, 103, "pad")
    assert stream == (order0 + order1)[: 8 * 24]
    assert PAD_SLOT not in stream
    assert [epoch_of(s, n, batch, "carry") for s in range(8)] == [0, 0, 0, 0, 0, 1, 1, 1]


def test_data_order_depends_only_on_seed_and_step():
    for tail in ("pad", "carry"):
        assert step_slots(50, 3, 1, 8, tail) == step_slots(50, 3, 1, 8, tail)
        assert step_slots(50, 3, 1, 8, tail) != step_slots(50, 9, 1, 8, tail)  # another epoch's shuffle
        assert step_slots(50, 3, 1, 8, tail) != step_slots(50, 3, 2, 8, tail)
    # Each epoch is shuffled anew: the same place in the next epoch (7 steps of 8 per epoch of 50,
    # padded) holds other samples, and the whole stream of epoch 1 is not epoch 0's again.
    assert step_slots(50, 3, 1, 8, "pad") != step_slots(50, 3 + 7, 1, 8, "pad")
    carry = [i for s in range(12) for i in step_slots(50, s, 1, 8, "carry")]
    assert sorted(carry[:50]) == list(range(50)) and carry[:46] != carry[50:96]




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
