"""A model folder missing a piece fails before any model is built, naming the folder and the file."""

import shutil

import pytest

from model.llama import ModelPathError, check_model_folder


@pytest.mark.parametrize(
    "remove, message",
    [
        (["model.safetensors"], "no weights"),
        (["tokenizer.model", "tokenizer.json"], "no tokenizer"),
        (["config.json"], "no config.json"),
    ],
)
def test_incomplete_model_folder(tiny_model_dir, tmp_path, remove, message):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for name in remove:
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelPathError, match=message) as err:
        check_model_folder(folder)
    assert str(folder) in str(err.value)


def test_complete_folder_and_hub_ids_pass(tiny_model_dir):
    check_model_folder(tiny_model_dir)
    check_model_folder("openlm-research/open_llama_7b")  # left to from_pretrained


@pytest.mark.parametrize("path", ["./openllama_ckpt_missing", "/nowhere/model", "no_slash"])
def test_missing_local_folder(path):
    with pytest.raises(ModelPathError, match="model folder not found"):
        check_model_folder(path)
