"""Any checkpoint through lm-evaluation-harness, base and fine-tuned side by side (``scripts/eval.sh``).

Each model given is evaluated by lm-eval's own ``run`` command (the ``hf`` backend, one device),
with the exact tokenizer (``model.hf_tokenizer``): OpenLLaMA's scores that did not reproduce were
a tokenizer problem, so no model here is read through a converted ``tokenizer.model``.

What a MODEL may be, and what is passed to lm-eval as ``pretrained=`` and ``tokenizer=``:

* an HF folder with an exact ``tokenizer.json`` (an export, ``make_shards.sh``'s output, a
  folder after ``scripts/exact_tokenizer.sh``): the folder, as it is, for both;
* an HF folder with a ``tokenizer.model`` and no exact ``tokenizer.json`` (a downloaded
  OpenLLaMA, ``./openllama_ckpt``): the folder, and an exact tokenizer folder written into the
  output dir (``OUT/tokenizers/LABEL``; the user's folder is not touched);
* the trainer's save path (``latest`` and ``global_step*``, no weights): exported on the fly
  with ``model.export`` into ``OUT/export/LABEL``, then as an HF folder;
* a hub id (``openlm-research/open_llama_7b``): the id, and an exact tokenizer made from the
  hub's ``tokenizer.model`` (only the tokenizer files are fetched here; lm-eval fetches the rest).

The token ids are the original's: lm-eval's ``HFLM`` encodes a loglikelihood context with the
tokenizer's own special tokens (``add_bos_token=True`` is passed so it always asks for them):
``[1] + sp.encode(text)``. With ``--apply_chat_template`` it renders the chat template to text and
adds no bos of its own when the text starts with ``<s>``, so a prompt is exactly the training
prompt (``prompt_ids``).

The models run one after the other in this process (one task index for all of them; for local
tasks only lm-eval's 14,000 built-in task files are not indexed at all). Everything is checked
first (models, tasks, the output dir): bad input gets one line and exit 1, with nothing written.
A run that fails later removes the output dir. The report (``openalpaca.eval_report``) comes last.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.hf_tokenizer import has_exact_tokenizer
from model.tokenizer import SP_MODEL
from openalpaca.prompts import LAYOUTS

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "eval_tasks"  # the project's own lm-eval tasks
DEMO_TASK = "openalpaca_demo"
DEMO_HELDOUT = REPO / "ckpt" / "demo" / "data" / "heldout.jsonl"  # written by scripts/demo.sh
DEMO_DATA_LINE = "    test: ckpt/demo/data/heldout.jsonl"  # the YAML's data file, replaced in the output dir's copy
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class EvalError(ValueError):
    """A problem with the command's inputs, phrased for the user (one line)."""


@dataclass(frozen=True)
class Preset:
    tasks: tuple[str, ...]
    chat_template: bool  # --apply_chat_template: prompts go through the model's chat template
    num_fewshot: int | None  # None: each task's own default
    batch_size: str
    about: str


PRESETS = {
    # OpenLLaMA's README table (lm-eval, zero-shot; CB and WSC dropped there). truthfulqa_mc is
    # truthfulqa_mc1 + truthfulqa_mc2 in lm-eval 0.4, rte is GLUE's (as lm-eval 0.3's rte was).
    "openllama": Preset(
        ("anli_r1", "anli_r2", "anli_r3", "arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa",
         "record", "rte", "truthfulqa_mc1", "truthfulqa_mc2", "wic", "winogrande"),
        chat_template=False, num_fewshot=0, batch_size="auto",
        about="OpenLLaMA README's suite, zero-shot, plain text (as OpenLLaMA was scored)"),
    # Instruction following through the recipe's chat template: IFEval's verifiable instructions
    # (zero-shot) and GSM8K (its 5 shots as earlier turns of the chat: fewshot_as_multiturn).
    "instruct": Preset(
        ("ifeval", "gsm8k"), chat_template=True, num_fewshot=None, batch_size="auto",
        about="instruction following: ifeval and gsm8k, generation through the chat template"),
    # The CPU demo's held-out set (eval_tasks/openalpaca_demo): greedy, the demo's exact match.
    "demo": Preset(
        (DEMO_TASK,), chat_template=True, num_fewshot=0, batch_size="64",
        about="the CPU demo's held-out set, greedy through the chat template, the demo's exact match"),
}


@dataclass
class Model:
    """One MODEL argument, resolved: what lm-eval gets, and what must be written first."""

    given: str
    label: str
    pretrained: str  # a folder or a hub id
    tokenizer: str  # a folder or a hub id with the exact tokenizer
    layout: str  # the chat template's layout (only used where a tokenizer is written here)
    export_from: Path | None = None  # a trainer save path to export into ``pretrained``
    tokenizer_from: Path | str | None = None  # a folder or hub id whose tokenizer.model makes ``tokenizer``
    notes: list[str] = field(default_factory=list)


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def is_save_path(folder: Path) -> bool:
    """The trainer's save path before an export: a ``latest`` file naming a ``global_step*`` folder."""
    return (folder / "latest").is_file() and any(folder.glob("global_step*"))


def recorded_layout(folder: Path) -> str | None:
    """The layout a trained folder records (``train_config.yaml``), None for a base model."""
    from model.export import train_config

    layout = train_config(folder).get("layout")
    return str(layout) if layout else None


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` whose owner is not a local folder (``ckpt/demo`` is a missing path, not a repo)."""
    return bool(HUB_ID.fullmatch(name)) and not Path(name.split("/")[0]).exists()


def unique_labels(names: Sequence[str]) -> list[str]:
    """Folder names as column labels, made unique with a suffix.

    >>> unique_labels(["ckpt/demo/base", "ckpt/demo/openalpaca", "other/base"])
    ['base', 'openalpaca', 'base-2']
    """
    labels: list[str] = []
    for name in names:
        label = re.sub(r"[^\w.-]", "_", Path(name.rstrip("/")).name) or "model"
        candidate, n = label, 1
        while candidate in labels:
            n += 1
            candidate = f"{label}-{n}"
        labels.append(candidate)
    return labels


def resolve_model(given: str, label: str, out_dir: Path, layout: str) -> Model:
    """What lm-eval is given for MODEL (see the module doc); raises EvalError for a bad one."""
    folder = Path(given)
    if folder.is_dir():
        folder = folder.resolve()
        model = Model(given, label, str(folder), str(folder), recorded_layout(folder) or layout)
        if not has_weights(folder):
            if not is_save_path(folder):
                raise EvalError(f"{given}: no model weights ({' or '.join(WEIGHT_FILES[::2])}) and no trainer "
                                f"checkpoint ('latest' and global_step*) in this folder")
            model.export_from = folder
            model.pretrained = model.tokenizer = str(out_dir / "export" / label)
            model.notes.append(f"a trainer save path: exported to {model.pretrained} first")
            return model
        if not (folder / "config.json").is_file():
            raise EvalError(f"{given}: no config.json next to the weights")
        if (folder / SP_MODEL).is_file() and not has_exact_tokenizer(folder):
            model.tokenizer_from = folder
            model.tokenizer = str(out_dir / "tokenizers" / label)
            model.notes.append(f"no exact tokenizer.json: one written to {model.tokenizer} (layout {model.layout})")
        return model
    if folder.exists():
        raise EvalError(f"{given}: not a folder (give a model folder, a trainer save path or a hub id)")
    if not looks_like_hub_id(given):
        raise EvalError(f"{given}: no such model folder")
    model = Model(given, label, given, str(out_dir / "tokenizers" / label), layout, tokenizer_from=given)
    model.notes.append(f"a hub id: exact tokenizer from its tokenizer.model, written to {model.tokenizer}")
    return model


def fetch_hub_tokenizer(repo_id: str, dst: Path) -> Path:
    """The hub repo's ``tokenizer.model`` and ``config.json`` in ``dst`` (the rest is lm-eval's to fetch)."""
    from huggingface_hub import hf_hub_download

    dst.mkdir(parents=True, exist_ok=True)
    for name in (SP_MODEL, "config.json"):
        try:
            hf_hub_download(repo_id, name, local_dir=dst)
        except Exception as err:  # offline, no such repo, no such file: all the user's to fix
            raise EvalError(f"{repo_id}: could not fetch {name} from the hub ({type(err).__name__})") from err
    return dst


def prepare(model: Model) -> None:
    """Write what lm-eval needs for ``model`` into the output dir: an export, an exact tokenizer."""
    from model.export import export
    from model.hf_tokenizer import write_hf_tokenizer

    if model.export_from is not None:
        export(model.export_from, model.pretrained)
    if model.tokenizer_from is not None:
        source = model.tokenizer_from
        if isinstance(source, str):  # a hub id: its tokenizer.model goes beside the tokenizer files
            source = fetch_hub_tokenizer(source, Path(model.tokenizer))
        write_hf_tokenizer(source, model.layout, out_dir=model.tokenizer)


def model_args(model: Model, dtype: str) -> str:
    """``--model_args`` of lm-eval's ``hf`` backend; ``add_bos_token=True``: ``[1] + sp.encode(text)``."""
    for path in (model.pretrained, model.tokenizer):
        if "," in path or "=" in path:
            raise EvalError(f"{path}: lm-eval's --model_args cannot hold a path with ',' or '='; rename or link it")
    return f"pretrained={model.pretrained},tokenizer={model.tokenizer},add_bos_token=True,dtype={dtype}"


def write_demo_task(out_dir: Path, heldout: Path) -> Path:
    """A copy of ``eval_tasks/openalpaca_demo`` reading ``heldout`` (an absolute path, so lm-eval
    finds it from any working directory); returns the folder to pass as ``--include_path``."""
    src = TASKS_DIR / DEMO_TASK
    dst = out_dir / "tasks" / DEMO_TASK
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "utils.py", dst / "utils.py")
    text = (src / f"{DEMO_TASK}.yaml").read_text()
    if DEMO_DATA_LINE not in text.splitlines():
        raise EvalError(f"{src}: the data_files line {DEMO_DATA_LINE.strip()!r} is missing")
    (dst / f"{DEMO_TASK}.yaml").write_text(text.replace(DEMO_DATA_LINE, f"    test: {json.dumps(str(heldout))}"))
    return out_dir / "tasks"


def lm_eval_argv(model: Model, args: argparse.Namespace, tasks: Sequence[str], preset: Preset,
                 include_path: Path | None, out_dir: Path) -> list[str]:
    """The arguments of ``lm_eval run`` for one model (what ``--dry_run`` prints)."""
    argv = ["--model", "hf", "--model_args", model_args(model, args.dtype), "--tasks", ",".join(tasks),
            "--batch_size", args.batch_size or preset.batch_size, "--output_path", str(out_dir / model.label)]
    if preset.num_fewshot is not None:
        argv += ["--num_fewshot", str(preset.num_fewshot)]
    if preset.chat_template:
        argv.append("--apply_chat_template")
    if include_path is not None:
        argv += ["--include_path", str(include_path)]
    if args.limit is not None:
        argv += ["--limit", args.limit]
    if args.device:
        argv += ["--device", args.device]
    return argv + list(args.lm_eval_args)


@functools.cache
def task_manager(include_path: str | None, include_defaults: bool):
    """lm-eval's task index (built once per process: the built-in one reads 14,000 YAML files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(tasks: Sequence[str], include_path: Path | None) -> bool:
    """Fail on a task lm-eval does not know; returns whether the built-in tasks are needed.

    The include path is indexed first, alone: when it has every task (the demo's, a test's),
    lm-eval's own task files need not be read at all (about 15 s on 2 cores, per model).
    """
    path = str(include_path) if include_path is not None else None
    if path is not None and all(task_manager(path, False).match_tasks([task]) for task in tasks):
        return False
    manager = task_manager(path, True)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s): {', '.join(unknown)} (lm_eval ls tasks lists them)")
    return True


def run_lm_eval(argv: Sequence[str], builtin_tasks: bool) -> None:
    """lm-eval's ``run`` command (its console script's own entry point) on ``argv``, in this process.

    Without ``builtin_tasks`` the task manager it makes indexes the include path only.
    """
    import lm_eval.tasks
    from lm_eval.__main__ import cli_evaluate

    manager, saved_argv = lm_eval.tasks.TaskManager, sys.argv
    try:
        sys.argv = ["lm-eval", "run", *argv]
        if not builtin_tasks:
            lm_eval.tasks.TaskManager = functools.partial(manager, include_defaults=False)
        cli_evaluate()
    finally:
        lm_eval.tasks.TaskManager, sys.argv = manager, saved_argv
        free_memory()


def free_memory() -> None:
    """Drop the model lm-eval loaded before the next one is (one device holds one at a time)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def results_file(run_dir: Path) -> Path:
    """The results JSON lm-eval wrote under ``--output_path run_dir`` (``MODEL_NAME/results_DATE.json``)."""
    found = sorted(run_dir.glob("*/results_*.json"))
    if not found:
        raise EvalError(f"{run_dir}: lm-eval wrote no results file")
    return found[-1]


def occupied(path: Path) -> bool:
    return path.exists() and not (path.is_dir() and not any(path.iterdir()))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    presets = "; ".join(f"{name}: {p.about} ({', '.join(p.tasks)})" for name, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="eval.sh",
        description="Evaluate models with lm-evaluation-harness (hf backend, the exact tokenizer) and write a "
        "side-by-side report: the first MODEL is the baseline, every other one is compared with it.",
        epilog="Flags after -- go to lm_eval run unchanged (e.g. -- --log_samples --seed 1).")
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="an HF folder, a base folder with tokenizer.model (./openllama_ckpt), the trainer's save "
                        "path (exported on the fly) or a hub id")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="openllama", help=f"task suite: {presets}")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated lm-eval tasks instead of the preset's (its other settings stay)")
    parser.add_argument("--limit", default=None, help="at most N documents per task (a quick look, not a score)")
    parser.add_argument("--output_dir", type=Path, default=Path("ckpt/eval"),
                        help="report, lm-eval's JSON per model, exports and tokenizer folders (default ckpt/eval)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    parser.add_argument("--include_path", type=Path, default=None, help="a folder of extra lm-eval task YAMLs")
    parser.add_argument("--heldout", type=Path, default=DEMO_HELDOUT,
                        help="--preset demo: the held-out records (default ckpt/demo/data/heldout.jsonl)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="chat template layout for models that record none (a base model): default the layout "
                        "of the trained models given, else original")
    parser.add_argument("--dtype", default="auto", help="lm-eval's dtype model arg (default auto: the config's)")
    parser.add_argument("--batch_size", default=None, help="lm-eval's --batch_size (default: the preset's)")
    parser.add_argument("--device", default=None, help="lm-eval's --device (default: lm-eval's choice)")
    parser.add_argument("--dry_run", action="store_true", help="print the lm_eval commands and exit; write nothing")
    args = parser.parse_args(argv)
    args.lm_eval_args = extra
    return args


def default_layout(args: argparse.Namespace) -> str:
    """The layout for models that record none: --layout, else the trained models' (one), else original."""
    if args.layout:
        return args.layout
    recorded = {recorded_layout(Path(m)) for m in args.models if Path(m).is_dir()} - {None}
    return recorded.pop() if len(recorded) == 1 else "original"


@dataclass
class Plan:
    models: list[Model]
    argvs: list[list[str]]
    tasks: list[str]
    include_path: Path | None
    builtin_tasks: bool


def make_plan(args: argparse.Namespace) -> Plan:
    """Check everything and build every lm-eval command before anything is written."""
    preset = PRESETS[args.preset]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(preset.tasks)
    if not tasks:
        raise EvalError("--tasks: no task given")
    out_dir = args.output_dir.resolve()
    layout = default_layout(args)
    models = [resolve_model(given, label, out_dir, layout)
              for given, label in zip(args.models, unique_labels(args.models), strict=True)]
    if occupied(args.output_dir) and not args.overwrite:
        raise EvalError(f"{args.output_dir}: already exists and is not empty "
                        "(pass --overwrite or another --output_dir)")
    include_path = args.include_path.resolve() if args.include_path else None
    if include_path is not None and not include_path.is_dir():
        raise EvalError(f"{args.include_path}: no such task folder")
    if DEMO_TASK in tasks:
        if include_path is not None:
            raise EvalError(f"--include_path: the {DEMO_TASK} task brings its own task folder; give one or the other")
        if not args.heldout.is_file():
            raise EvalError(f"{args.heldout}: no held-out file (bash scripts/demo.sh writes it)")
        include_path = out_dir / "tasks"
    builtin = check_tasks(tasks, TASKS_DIR / DEMO_TASK if DEMO_TASK in tasks else include_path)
    argvs = [lm_eval_argv(model, args, tasks, preset, include_path, out_dir) for model in models]
    return Plan(models, argvs, tasks, include_path, builtin)


def evaluate(args: argparse.Namespace, plan: Plan) -> Path:
    """Run every model and write the report; the output dir is removed if anything fails."""
    from openalpaca.eval_report import write_report

    out_dir = args.output_dir.resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)  # --overwrite (checked in make_plan)
    out_dir.mkdir(parents=True)
    try:
        if plan.include_path == out_dir / "tasks":
            write_demo_task(out_dir, args.heldout.resolve())
        runs = []
        for model, argv in zip(plan.models, plan.argvs, strict=True):
            prepare(model)
            print(f"\n=== {model.label}: lm_eval run {shlex.join(argv)}", flush=True)
            run_lm_eval(argv, plan.builtin_tasks)
            runs.append((model.label, results_file(out_dir / model.label)))
        table = write_report(runs, out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    print(f"\n{table}\nreport: {out_dir / 'report.md'}, {out_dir / 'report.png'}")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    from model.export import ExportError

    args = parse_args(argv)
    try:
        plan = make_plan(args)
        if args.dry_run:
            for model, cmd in zip(plan.models, plan.argvs, strict=True):
                for note in model.notes:
                    print(f"# {model.label}: {note}")
                print(f"lm_eval run {shlex.join(cmd)}")
            return 0
        evaluate(args, plan)
    except (EvalError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
