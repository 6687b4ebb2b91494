"""Hugging Face `datasets` is importable from every entry point, run the way users run it.

The original repository had a `datasets/` *package* at its root, so `import datasets` in any
script run from the root found it instead of Hugging Face's. Here `datasets/` is a data folder
with no Python in it; this test proves the import resolves to the installed library.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, clean_env, run

# (module to import, directory Python puts first on sys.path when the entry point runs)
ENTRY_POINTS = [
    ("process_dataset", REPO),  # python process_dataset.py
    ("train_sft", REPO),  # python train_sft.py / scripts/train_sft.sh (cd's to the root)
    ("inference", REPO),  # python inference.py
    ("model.export", REPO),  # python -m model.export (scripts/export_hf.sh)
    ("demo.synthetic", REPO),  # python -m demo.synthetic (scripts/demo.sh)
    ("demo.__main__", REPO),  # python -m demo (scripts/demo.sh)
    ("model.download", REPO),  # python -m model.download (scripts/download.sh)
    ("zero_to_fp32", REPO / "scripts"),  # python {save_path}/zero_to_fp32.py
]


@pytest.mark.slow
@pytest.mark.parametrize("module, first_on_path", ENTRY_POINTS, ids=[m for m, _ in ENTRY_POINTS])
def test_hf_datasets_not_shadowed(module, first_on_path):
    code = f"import {module}, datasets; print(datasets.__file__); print(callable(datasets.load_dataset))"
    # `python -c` puts the working directory first on sys.path, as `python script.py` puts the script's.
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=first_on_path, capture_output=True, text=True,
                          timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, has_load_dataset = proc.stdout.split()[-2:]
    assert "site-packages" in Path(path).parts
    assert has_load_dataset == "True"


def test_datasets_folder_holds_no_python():
    assert not (REPO / "datasets" / "__init__.py").exists()
    assert not list((REPO / "datasets").rglob("*.py"))


def test_process_dataset_help_runs_from_the_root():
    proc = run([sys.executable, "process_dataset.py", "--help"], timeout=60)
    assert proc.returncode == 0 and "--max_words" in proc.stdout


def test_download_says_clearly_when_it_cannot(tmp_path):
    proc = subprocess.run(["bash", "scripts/download.sh", "openlm-research/open_llama_3b", str(tmp_path / "o")],
                          cwd=REPO, env={**clean_env(), "HF_HUB_OFFLINE": "1"}, check=False, capture_output=True,
                          text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: could not download openlm-research/open_llama_3b")
