"""scripts/eval.sh: lm-evaluation-harness on tiny models, checked against plain transformers and the demo's scorer.

Two runs of the command (one per module fixture, each with several models) carry the slow tests:
a local multiple-choice task on the random tiny model (no tokenizer.json: the command writes the
exact one) and the prompt-sensitive copy model, and the demo's task on the copy model and two
copies with a planted chat template error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import COPY_TASKS, run

MC_TASK = "openalpaca_test_mc"
# Double spaces, a text that starts with a space, a newline: a converted (not exact) tokenizer gives
# other ids here (the tiny tokenizer: for the leading space).
MC_DOCS = [
    {"question": "which  fruit is red", "choices": ["apple", "pear  plum", "fig"], "label": 0},
    {"question": "say two", "choices": ["one", "two", "three\ngreen"], "label": 1},
    {"question": " a colour", "choices": ["kiwi lime", "blue", "mango"], "label": 1},
    {"question": "Repeat the words.", "choices": ["red blue", "date  mango", "white"], "label": 0},
]
MC_YAML = """task: openalpaca_test_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA_FILE
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}\\nAnswer:"
doc_to_target: "{{label}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def results_of(out: Path, label: str) -> tuple[dict, Path]:
    [path] = sorted((out / label).glob("*/results_*.json"))
    return json.loads(path.read_text()), path


def samples_of(out: Path, label: str, task: str) -> list[dict]:
    [path] = sorted((out / label).glob(f"*/samples_{task}_*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def mc_run(tmp_path_factory, tiny_model_dir, copy_model_dir):
    """One eval.sh run: the tiny base model (tokenizer.model only) and the copy model on a local task."""
    root = tmp_path_factory.mktemp("eval_mc")
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in MC_DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / "mc.yaml").write_text(MC_YAML.replace("DATA_FILE", json.dumps(str(data))))
    out = root / "out"
    proc = run(["bash", "scripts/eval.sh", str(tiny_model_dir), str(copy_model_dir), "--tasks", MC_TASK,
                "--include_path", str(root / "tasks"), "--batch_size", "4", "--output_dir", str(out),
                "--", "--log_samples"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def reference_logliks(model_dir: Path, doc: dict) -> list[float]:
    """Each choice's log-likelihood by plain transformers: the original tokenizer's ids (a bos,
    then sentencepiece's), the continuation being what follows the context's ids."""
    import sentencepiece as spm
    import torch
    from transformers import AutoModelForCausalLM

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    context = f"{doc['question']}\nAnswer:"
    context_ids = [1] + sp.encode(context)
    logliks = []
    for choice in doc["choices"]:
        whole = [1] + sp.encode(context + " " + choice)
        assert whole[: len(context_ids)] == context_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        logliks.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole))))
    return logliks


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "copy"])
def test_multiple_choice_equals_plain_transformers(mc_run, which, tiny_model_dir, copy_model_dir):
    out, _ = mc_run
    model_dir = {"tiny": tiny_model_dir, "copy": copy_model_dir}[which]
    label = model_dir.name  # the command labels a model by its folder's name
    samples = sorted(samples_of(out, label, MC_TASK), key=lambda s: s["doc_id"])
    acc, acc_norm = [], []
    for sample in samples:
        doc = sample["doc"]
        expected = reference_logliks(model_dir, doc)
        got = [float(resp[0][0]) for resp in sample["resps"]]
        assert got == pytest.approx(expected, abs=1e-4), doc
        acc.append(float(max(range(len(expected)), key=expected.__getitem__) == doc["label"]))
        normed = [ll / len(choice) for ll, choice in zip(expected, doc["choices"], strict=True)]
        acc_norm.append(float(max(range(len(normed)), key=normed.__getitem__) == doc["label"]))
    assert len(samples) == len(MC_DOCS)
    results, _ = results_of(out, label)
    assert results["results"][MC_TASK]["acc,none"] == pytest.approx(sum(acc) / len(acc))
    assert results["results"][MC_TASK]["acc_norm,none"] == pytest.approx(sum(acc_norm) / len(acc_norm))


def table_rows(report: str) -> dict[tuple[str, str], list[str]]:
    lines = [line for line in report.splitlines() if line.startswith("| ")][1:]
    return {(cells[0], cells[1]): cells[2:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                          for line in lines)}


@pytest.mark.slow
def test_report_numbers_are_the_json_numbers(mc_run, tiny_model_dir, copy_model_dir):
    out, proc = mc_run
    report = (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = table_rows(report)
    base, _ = results_of(out, tiny_model_dir.name)
    tuned, _ = results_of(out, copy_model_dir.name)
    assert set(rows) == {(MC_TASK, "acc"), (MC_TASK, "acc_norm")}
    for (task, metric), cells in rows.items():
        a, b = base["results"][task][f"{metric},none"], tuned["results"][task][f"{metric},none"]
        ea, eb = base["results"][task][f"{metric}_stderr,none"], tuned["results"][task][f"{metric}_stderr,none"]
        assert cells == [f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}", f"±{ea:.4f} / ±{eb:.4f}"]
    assert "| " + " | ".join(["task", "metric", tiny_model_dir.name, copy_model_dir.name]) in report
    assert "| openalpaca_test_mc | acc |" in proc.stdout  # the table is printed too
    # the base folder got an exact tokenizer in the output dir, and its own folder was left alone
    assert (out / "tokenizers" / tiny_model_dir.name / "tokenizer.json").is_file()
    assert not (tiny_model_dir / "tokenizer.json").exists()


# --- the demo's task -------------------------------------------------------------------------

def heldout_records() -> list[dict]:
    """Demo-format records for the copy model: most responses right, some wrong on purpose."""
    words = "apple pear plum fig kiwi lime date mango".split()
    records = []
    for i in range(12):
        instruction = list(COPY_TASKS)[i % 2]
        context = " ".join(words[i % 8: i % 8 + 1 + i % 3])
        response = " ".join(COPY_TASKS[instruction](context.split()))
        if i % 4 == 3:
            response = "grape melon"  # never the answer
        records.append({"instruction": instruction, "context": context, "response": response,
                        "category": "repeat" if i % 2 == 0 else "first"})
    return records


def plant(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of ``src`` whose chat template has ``old`` replaced by ``new`` (once)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    assert config["chat_template"].count(old) == 1
    config["chat_template"] = config["chat_template"].replace(old, new)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


GEN_PROMPT = "{{- eos_token + bos_token }}\n{%- endif %}"  # the template's generation prompt: </s><s>
LEADING_BOS = "    {{- bos_token }}\n"  # a user message opens with <s> (clean layout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, copy_model_dir):
    """One eval.sh --preset demo run: the copy model, one without the bos after the prompt's eos,
    one without the leading bos."""
    root = tmp_path_factory.mktemp("eval_demo")
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in heldout_records()))
    no_bridge_bos = plant(copy_model_dir, root / "no_bridge_bos", GEN_PROMPT,
                          GEN_PROMPT.replace("eos_token + bos_token", "eos_token"))
    no_leading_bos = plant(copy_model_dir, root / "no_leading_bos", LEADING_BOS, "")
    out = root / "out"
    proc = run(["bash", "scripts/eval.sh", str(copy_model_dir), str(no_bridge_bos), str(no_leading_bos),
                "--preset", "demo", "--heldout", str(heldout), "--output_dir", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, heldout


@pytest.fixture(scope="module")
def demo_scorer_score(demo_run, copy_model_dir) -> float:
    """The demo's own score of the copy model: greedy answers through the inference code path."""
    from demo import synthetic
    from demo.evaluate import greedy_predictions
    from model.llama import load_model, load_tokenizer

    records = synthetic.read_jsonl(demo_run[1])
    predictions = greedy_predictions(load_model(copy_model_dir), load_tokenizer(copy_model_dir), records,
                                     max_new_tokens=24, layout="clean")
    return synthetic.score(records, predictions)[0]


@pytest.mark.slow
def test_demo_task_equals_demo_scorer(demo_run, demo_scorer_score, copy_model_dir):
    out, _ = demo_run
    assert 0 < demo_scorer_score < 1  # right and wrong answers both counted
    results, _ = results_of(out, copy_model_dir.name)
    assert results["results"]["openalpaca_demo"]["exact_match,none"] == pytest.approx(demo_scorer_score)


@pytest.mark.slow
def test_demo_task_sees_a_template_error(demo_run, demo_scorer_score):
    """The bos after the prompt's eos dropped changes the score; a dropped leading bos does not,
    as lm-eval adds one of its own when the rendered text does not start with <s>."""
    out, _ = demo_run
    broken, _ = results_of(out, "no_bridge_bos")
    leading, _ = results_of(out, "no_leading_bos")
    assert broken["results"]["openalpaca_demo"]["exact_match,none"] != pytest.approx(demo_scorer_score)
    assert leading["results"]["openalpaca_demo"]["exact_match,none"] == pytest.approx(demo_scorer_score)


def test_demo_metric_is_the_demo_scorers():
    """eval_tasks' exact_match (loaded by lm-eval from its path) is demo/synthetic.py's."""
    import importlib.util

    from demo.synthetic import exact_match

    spec = importlib.util.spec_from_file_location("demo_task_utils", "eval_tasks/openalpaca_demo/utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    cases = [(" cat dog\n", "cat dog"), ("cat dog fox", "cat dog"), ("Cat dog", "cat dog"), ("cat  dog", "cat dog"),
             ("", ""), ("\tx ", "x"), ("x", " x\n")]
    for prediction, reference in cases:
        assert utils.exact_match(prediction, reference) == exact_match(prediction, reference)
        assert utils.process_results({"response": reference}, [prediction]) == {
            "exact_match": float(exact_match(prediction, reference))}


# --- bad input and the commands built --------------------------------------------------------

def call(argv: list[str], capsys) -> tuple[int, str, str]:
    from openalpaca.lmeval import main

    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_bad_models_one_line_nothing_written(tmp_path, tiny_model_dir, capsys):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights)
    shutil.copy(tiny_model_dir / "tokenizer.model", no_weights)
    out = tmp_path / "out"
    for model, message in [(str(tmp_path / "missing"), "no such model folder"), (str(no_weights), "no model weights")]:
        rc, stdout, stderr = call([str(tiny_model_dir), model, "--tasks", "arc_easy", "--output_dir", str(out)], capsys)
        assert rc == 1 and stdout == ""
        assert stderr.count("\n") == 1 and message in stderr and model in stderr, stderr
        assert not out.exists()


def test_dry_run_plans_exports_and_tokenizers(tmp_path, tiny_model_dir, capsys):
    """A save path is exported, a base folder gets a tokenizer, an exact folder is used as it is;
    the command says so and writes nothing."""
    from model.hf_tokenizer import write_hf_tokenizer

    trained = tmp_path / "trained"  # shaped like an export: weights, exact tokenizer, the run's layout
    shutil.copytree(tiny_model_dir, trained)
    write_hf_tokenizer(trained, "clean")
    (trained / "train_config.yaml").write_text("layout: clean\n")
    save = tmp_path / "run"  # the trainer's save path before an export
    save.mkdir()
    (save / "latest").write_text("global_step5")
    (save / "global_step5").mkdir()
    out = tmp_path / "out"
    models = [str(tiny_model_dir), str(save), str(trained)]
    rc, stdout, stderr = call([*models, "--preset", "demo", "--heldout", str(tmp_path / "missing.jsonl"),
                               "--output_dir", str(out), "--dry_run"], capsys)
    assert rc == 1 and "missing.jsonl" in stderr and not out.exists()
    (tmp_path / "heldout.jsonl").write_text("")
    rc, stdout, _ = call([*models, "--preset", "demo", "--heldout", str(tmp_path / "heldout.jsonl"),
                          "--output_dir", str(out), "--dry_run"], capsys)
    assert rc == 0 and not out.exists()
    commands = [line for line in stdout.splitlines() if line.startswith("lm_eval run ")]
    assert len(commands) == 3
    assert f"pretrained={tiny_model_dir},tokenizer={out}/tokenizers/{tiny_model_dir.name},add_bos_token=True" \
        in commands[0]
    assert f"pretrained={out}/export/run,tokenizer={out}/export/run," in commands[1]
    assert f"pretrained={trained},tokenizer={trained}," in commands[2]
    assert all("--apply_chat_template" in c and "--tasks openalpaca_demo" in c for c in commands)
    assert "(layout clean)" in stdout  # the base model is asked in the trained model's layout
    assert not (tiny_model_dir / "tokenizer.json").exists()


@pytest.mark.slow
def test_presets_and_unknown_task(tmp_path, tiny_model_dir, capsys):
    """The default preset's tasks all exist in the pinned lm-eval; an unknown one is one line."""
    from openalpaca.lmeval import PRESETS

    out = tmp_path / "out"
    rc, stdout, _ = call([str(tiny_model_dir), "--output_dir", str(out), "--dry_run"], capsys)
    assert rc == 0 and not out.exists()
    assert f"--tasks {','.join(PRESETS['openllama'].tasks)} " in stdout and "--num_fewshot 0" in stdout
    rc, stdout, _ = call([str(tiny_model_dir), "--preset", "instruct", "--output_dir", str(out), "--dry_run"], capsys)
    assert rc == 0 and "--tasks ifeval,gsm8k" in stdout and "--apply_chat_template" in stdout
    rc, stdout, stderr = call([str(tiny_model_dir), "--tasks", "arc_easy,no_such_task", "--output_dir", str(out)],
                              capsys)
    assert rc == 1 and stdout == "" and stderr.count("\n") == 1 and "no_such_task" in stderr
    assert not out.exists()


def test_report_rows_from_results_json(tmp_path):
    """Rows, labels, differences and stderr straight from lm-eval's results layout (filters, N/A stderr)."""
    from openalpaca.eval_report import write_report

    def results(strict: float, strict_err: float, flexible: float, flexible_err: float | str) -> dict:
        return {"results": {"gsm8k": {
            "alias": "gsm8k", "exact_match,strict-match": strict, "exact_match_stderr,strict-match": strict_err,
            "exact_match,flexible-extract": flexible, "exact_match_stderr,flexible-extract": flexible_err}}}

    a, b = results(0.25, 0.05, 0.5, "N/A"), results(0.375, 0.0625, 0.125, 0.01)
    for name, data in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(data))
    table = write_report([("base", tmp_path / "a.json"), ("tuned", tmp_path / "b.json")], tmp_path)
    assert table_rows(table) == {
        ("gsm8k", "exact_match (strict-match)"): ["0.2500", "0.3750", "+0.1250", "±0.0500 / ±0.0625"],
        ("gsm8k", "exact_match (flexible-extract)"): ["0.5000", "0.1250", "-0.3750", "n/a / ±0.0100"],
    }
    assert "Mean of the 2 rows: base 0.3750, tuned 0.2500" in table
    assert (tmp_path / "report.png").is_file() and table_rows((tmp_path / "report.md").read_text()) == table_rows(table)
