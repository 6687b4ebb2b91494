"""From a real ZeRO-3 checkpoint to a loadable HF folder: the seed's route and ``export_hf.sh``.

A tiny LLaMA (and a tied-embeddings twin) is trained 3 steps by a real one-rank ZeRO-3 engine,
once per module, in a child process (``tests/helpers_engine.py``): DeepSpeed's process group is
global to a process, and other test files initialise DeepSpeed with other settings. The child
records the engine's own logits on a fixed input; every exported folder must reproduce them.

Tolerances. fp32 exports are the engine's fp32 master weights bit for bit, so logits match to
1e-5 (float noise of the reference forward). A bf16/fp16 export is those weights rounded to
nearest, checked two ways: (1) exactly: loaded and upcast, each weight equals the fp32 weight
rounded through the export dtype, and the logits equal those of that rounded model to 1e-5;
(2) against the engine: with unit roundoff u (bf16 2^-9, fp16 2^-11) per weight, the logits of
this 2-layer model move by a few u relative to their scale, so the bound is
8 * u * max|engine logits| (measured: about a quarter of that).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import helpers_engine  # noqa: E402  (sibling helper module, tests/ is not a package)

from demo.tiny import llama_config, make_tiny_checkpoint, tokenizer_vocab_size, write_tiny_llama  # noqa: E402
from model import export as export_mod  # noqa: E402

pytestmark = pytest.mark.slow  # launcher runs and child processes

TEXTS = ["the quick brown fox jumps over the lazy dog and the cat sat on the mat"] * 20
SHAPE = {"hidden_size": 32, "num_layers": 2, "num_heads": 4}
UNIT_ROUNDOFF = {"bf16": 2.0**-9, "fp16": 2.0**-11}
SMALL_SHARD = "60KB"  # the fp32 tiny model is ~210 KB: several shards
SIDE_FILES = ("generation_config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def run(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command as a user would (no PYTHONPATH into the repo), failing with its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", **(extra_env or {}))
    done = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def copy_save(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Trained ZeRO-3 checkpoints laid out as the trainer writes them, and the engines' logits.

    "untied" is the OpenLLaMA layout, trained in fp32; "tied" shares input and output embeddings,
    which DeepSpeed lists under two names; "bf16" is "untied" trained in bf16 (the trainer's
    default). All come from one child process (one start-up for all).
    """
    root = tmp_path_factory.mktemp("export")
    base = make_tiny_checkpoint(root / "base", TEXTS, vocab_size=320, seed=0, **SHAPE)
    base_tied = root / "base_tied"
    shutil.copytree(base, base_tied)
    config = llama_config(tokenizer_vocab_size(base), **SHAPE)
    config.tie_word_embeddings = True
    write_tiny_llama(base_tied, config, seed=0)
    bases = {"untied": base, "tied": base_tied, "bf16": base}
    jobs = [(path, root / f"save_{name}", root / f"{name}_logits.pt") for name, path in bases.items()]
    helpers_engine.make_trained_checkpoints(jobs, steps=3, dtype=["fp32", "fp32", "bf16"])
    found = {}
    for name, (model_dir, save, logits) in zip(bases, jobs, strict=True):
        ref = torch.load(logits)
        found[name] = {"base": model_dir, "save": save, "input_ids": ref["input_ids"], "logits": ref["logits"]}
    found["untied"]["init"] = {k: v.clone() for k, v in load(base).state_dict().items()}
    return found


@pytest.fixture(scope="module")
def ckpt(ckpts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return ckpts["untied"]


@pytest.fixture(scope="module")
def bf16_ckpt(ckpts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return ckpts["bf16"]


@pytest.fixture(scope="module")
def tied_ckpt(ckpts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return ckpts["tied"]


def load(path: Path, dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """``from_pretrained`` with no missing or unexpected weights."""
    from transformers import LlamaForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    model, info = LlamaForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def check_index(folder: Path, index_name: str) -> dict[str, str]:
    """The index names every weight once, every file it names exists and holds exactly its weights."""
    pairs = json.loads((folder / index_name).read_text(), object_pairs_hook=lambda kv: kv)
    weight_map_pairs = dict(pairs)["weight_map"]
    names = [name for name, _ in weight_map_pairs]
    assert len(names) == len(set(names)), "a weight is named twice in the index"
    weight_map = dict(weight_map_pairs)
    found: dict[str, str] = {}
    for filename in sorted(set(weight_map.values())):
        path = folder / filename
        assert path.is_file(), f"index names missing file {filename}"
        if filename.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        else:
            keys = list(torch.load(path, weights_only=True, mmap=True).keys())
        for key in keys:
            assert key not in found, f"{key} stored in {found[key]} and {filename}"
            found[key] = filename
    assert found == weight_map
    leftovers = {p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors")} - set(weight_map.values())
    assert not leftovers, f"weight files the index does not name: {leftovers}"
    return weight_map


# The original's sampling (the seed README's snippet), written out: every exported folder carries it.
ORIGINAL_SAMPLING = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "top_k": 50,
                     "top_p": 0.9, "max_new_tokens": 128}


def check_tokenizer(folder: Path) -> None:
    """The exact tokenizer and the chat template of the run's layout (none recorded: original), and
    the original's sampling in ``generation_config.json``.

    The save paths here hold only the base folder's ``tokenizer.model`` and OpenLLaMA's config
    (as a save path written before the trainer wrote the exact files): the exporters add them."""
    from tests.exact_tokenizer import assert_exact_tokenizer

    assert_exact_tokenizer(folder, "original")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert {k: generation.get(k) for k in ORIGINAL_SAMPLING} == ORIGINAL_SAMPLING


def test_engine_trained_away_from_init(ckpt: dict[str, Any], tmp_path: Path) -> None:
    """Guards the other tests: exporting the base weights by mistake would not pass unnoticed."""
    out = export_mod.export(ckpt["save"], tmp_path / "hf", dtype="fp32")
    trained = load(out).state_dict()
    moved = [k for k, v in ckpt["init"].items() if not torch.equal(v, trained[k])]
    assert len(moved) == len(ckpt["init"])


def test_seed_command_then_make_shards(ckpt: dict[str, Any], tmp_path: Path) -> None:
    """The README's two commands, exactly: one fp32 file, then shards that load and match the engine."""
    save = copy_save(ckpt["save"], tmp_path / "openalpaca")
    run([sys.executable, f"{save}/zero_to_fp32.py", str(save), f"{save}/pytorch_model.bin"], cwd=tmp_path)
    consolidated = save / "pytorch_model.bin"
    assert consolidated.is_file()
    state = torch.load(consolidated, weights_only=True)
    assert set(state) == set(ckpt["init"]) and all(t.dtype == torch.float32 for t in state.values())
    assert not list(save.glob(".pytorch_model.bin.*")), "temp file left behind"

    tokenizer_files = {p.name for p in save.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))}
    tags = [p.name for p in save.glob("global_step*")]
    assert tags and (save / "latest").is_file()
    done = run([str(REPO / "scripts" / "make_shards.sh"), str(save), "--max_shard_size", SMALL_SHARD], cwd=tmp_path)
    assert "removed" in done.stdout
    assert not consolidated.exists(), "the consolidated file must go once the shards are written"
    weight_map = check_index(save, "pytorch_model.bin.index.json")
    shards = sorted(set(weight_map.values()))
    # The original's make_shards.sh: what is left is the seed README's listing (plus our train_config.yaml
    # and the exact tokenizer.json); the DeepSpeed checkpoint, latest and zero_to_fp32.py are gone, each
    # removal printed.
    listing = {"config.json", "generation_config.json", "pytorch_model.bin.index.json", "train_config.yaml",
               "tokenizer.json", *tokenizer_files, *shards}
    assert {p.name for p in save.iterdir()} == listing
    for name in (*tags, "latest", "zero_to_fp32.py"):
        assert f"removed {save / name} (DeepSpeed state" in done.stdout
    assert len(shards) >= 2
    assert all(re.fullmatch(rf"pytorch_model-\d{{5}}-of-{len(shards):05d}\.bin", s) for s in shards), shards
    torch.testing.assert_close(logits_of(load(save), ckpt["input_ids"]), ckpt["logits"], atol=1e-5, rtol=0)
    check_tokenizer(save)


def test_make_shards_keep_deepspeed_keeps_the_checkpoint(ckpt: dict[str, Any], tmp_path: Path) -> None:
    save = copy_save(ckpt["save"], tmp_path / "openalpaca")
    run([sys.executable, f"{save}/zero_to_fp32.py", str(save), f"{save}/pytorch_model.bin"], cwd=tmp_path)
    before = {p.name for p in save.iterdir()} - {"pytorch_model.bin"}
    done = run([str(REPO / "scripts" / "make_shards.sh"), str(save), "--keep_deepspeed"], cwd=tmp_path)
    assert "DeepSpeed state" not in done.stdout
    after = {p.name for p in save.iterdir()}
    assert before <= after and "pytorch_model.bin" not in after
    assert (save / "pytorch_model-00001-of-00001.bin").is_file()  # 5GB shards by default: one here
    torch.testing.assert_close(logits_of(load(save), ckpt["input_ids"]), ckpt["logits"], atol=1e-5, rtol=0)


def test_make_shards_to_other_dir_keeps_source(ckpt: dict[str, Any], tmp_path: Path) -> None:
    """--out_dir gets the shards plus config and tokenizer; the save path keeps its pytorch_model.bin."""
    save = copy_save(ckpt["save"], tmp_path / "save")
    zero_to_fp32 = load_script(save / "zero_to_fp32.py")
    zero_to_fp32.main([str(save), str(save / "pytorch_model.bin")])
    out = tmp_path / "sharded"
    make_shards = str(REPO / "scripts" / "make_shards.sh")
    run([make_shards, "save", "--out_dir", "sharded", "--max_shard_size", "1GB"], cwd=tmp_path)
    assert (save / "pytorch_model.bin").is_file()
    assert check_index(out, "pytorch_model.bin.index.json") and (out / "pytorch_model-00001-of-00001.bin").is_file()
    assert all((out / name).is_file() for name in ("config.json", *SIDE_FILES))
    torch.testing.assert_close(logits_of(load(out), ckpt["input_ids"]), ckpt["logits"], atol=1e-5, rtol=0)
    check_tokenizer(out)


def load_script(path: Path) -> Any:
    """Import the converter copied into a save path, as ``python SAVE/zero_to_fp32.py`` would run it."""
    spec = importlib.util.spec_from_file_location("save_path_zero_to_fp32", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deepspeed_directory_form_passes_through(ckpt: dict[str, Any], tmp_path: Path) -> None:
    """A directory (or suffix-less) second argument gets DeepSpeed's sharded output, flags forwarded."""
    zero_to_fp32 = load_script(ckpt["save"] / "zero_to_fp32.py")
    out = tmp_path / "ds_out"
    zero_to_fp32.main([str(ckpt["save"]), str(out), "--max_shard_size", SMALL_SHARD, "--safe_serialization"])
    weight_map = check_index(out, "model.safetensors.index.json")
    assert len(set(weight_map.values())) >= 2
    from safetensors.torch import load_file

    merged = {k: v for f in set(weight_map.values()) for k, v in load_file(str(out / f)).items()}
    reference = torch.load(export_seed_file(ckpt, tmp_path), weights_only=True)
    assert merged.keys() == reference.keys() and all(torch.equal(merged[k], reference[k]) for k in merged)


def export_seed_file(ckpt: dict[str, Any], tmp_path: Path) -> Path:
    target = tmp_path / "one" / "pytorch_model.bin"
    load_script(ckpt["save"] / "zero_to_fp32.py").main([str(ckpt["save"]), str(target)])
    return target


def test_deepspeeds_zero_to_torch_still_runs(ckpt: dict[str, Any], tmp_path: Path) -> None:
    """DeepSpeed's zero_to_torch.py in the save path imports our zero_to_fp32.py by file name."""
    save = ckpt["save"]
    cmd = [sys.executable, str(save / "zero_to_torch.py"), str(save), str(tmp_path / "t"), "--dtype", "bf16"]
    run(cmd, cwd=tmp_path)
    state = torch.load(tmp_path / "t" / "pytorch_model.bin", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in state.values())


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_export_every_dtype_and_format(ckpt: dict[str, Any], tmp_path: Path, dtype: str, fmt: str) -> None:
    """Same entry point as export_hf.sh (``main(argv)``; the wrapper itself is run in the next test)."""
    out = tmp_path / "hf"
    argv = [str(ckpt["save"]), str(out), "--dtype", dtype, f"--{fmt}", "--max_shard_size", SMALL_SHARD]
    assert export_mod.main(argv) == 0
    weight_map = check_index(out, export_mod.INDEX_NAMES[fmt])
    assert len(set(weight_map.values())) >= 2
    assert all(name.endswith("." + fmt) for name in weight_map.values())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == export_mod.CONFIG_DTYPE_NAMES[dtype]
    assert all((out / name).is_file() for name in SIDE_FILES)
    check_tokenizer(out)

    native = load(out, dtype=None)
    assert native.dtype == export_mod.DTYPES[dtype], "from_pretrained must pick the dtype up from config.json"
    upcast = load(out)
    got = logits_of(upcast, ckpt["input_ids"])
    if dtype == "fp32":
        torch.testing.assert_close(got, ckpt["logits"], atol=1e-5, rtol=0)
        return
    fp32_weights = fp32_reference(ckpt)
    rounded = {k: v.to(export_mod.DTYPES[dtype]).float() for k, v in fp32_weights.items()}
    upcast_state = upcast.state_dict()
    assert all(torch.equal(upcast_state[k], rounded[k]) for k in rounded), "weights are not the fp32 ones rounded"
    reference = load(ckpt["base"])
    reference.load_state_dict(rounded)
    torch.testing.assert_close(got, logits_of(reference, ckpt["input_ids"]), atol=1e-5, rtol=0)
    bound = 8 * UNIT_ROUNDOFF[dtype] * ckpt["logits"].abs().max().item()
    assert (got - ckpt["logits"]).abs().max().item() <= bound


def fp32_reference(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The engine's fp32 weights, via DeepSpeed's own (non-lazy) converter."""
    if "fp32_weights" not in ckpt:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt["fp32_weights"] = get_fp32_state_dict_from_zero_checkpoint(str(ckpt["save"]))
    return ckpt["fp32_weights"]


def test_export_hf_sh_defaults_from_any_cwd(ckpt: dict[str, Any], tmp_path: Path) -> None:
    """The wrapper: relative paths from the caller's cwd; default safetensors in the training dtype."""
    save = tmp_path / "bf16_run"
    save.mkdir()
    for entry in ckpt["save"].iterdir():
        if entry.is_dir():
            (save / entry.name).symlink_to(entry)
        elif entry.name != "train_config.yaml":
            shutil.copy2(entry, save / entry.name)
    (save / "train_config.yaml").write_text("dtype: bf16\nepochs: 2\n")
    run([str(REPO / "scripts" / "export_hf.sh"), "bf16_run", "out/hf"], cwd=tmp_path)
    out = tmp_path / "out" / "hf"
    weight_map = check_index(out, "model.safetensors.index.json")
    assert set(weight_map.values()) == {"model.safetensors"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load(out, dtype=None).dtype == torch.bfloat16


def test_padded_multi_rank_slices(tmp_path: Path) -> None:
    """Weights split over 3 ranks with padding (sizes not divisible by 3), as DeepSpeed lays them out.

    Built directly with DeepSpeed's ``GatheredTensor`` (a 3-rank engine costs ~30 s here; one was
    run by hand and exported bit for bit). The gathered tensor is a view into the padded
    concatenation: the safetensors writer must copy only the view, ``.bin`` must not store the
    padding.
    """
    from deepspeed.utils.zero_to_fp32 import GatheredTensor
    from safetensors.torch import load_file

    world, shapes = 3, {"a.weight": (5, 7), "b.weight": (4,), "c.weight": (3, 3)}
    full = {name: torch.randn(shape) for name, shape in shapes.items()}
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    layout, offset = {}, 0
    for name, tensor in full.items():
        part = -(-tensor.numel() // world)
        padded = torch.cat([tensor.reshape(-1), torch.full((part * world - tensor.numel(),), float("nan"))])
        for rank in range(world):
            per_rank[rank].append(padded[rank * part : (rank + 1) * part])
        layout[name] = (offset, part, torch.Size(tensor.shape))
        offset += part
    flat_groups = [[torch.cat(chunks)] for chunks in per_rank]
    lazy = {n: GatheredTensor(flat_groups, [0, offset], o, p, shape) for n, (o, p, shape) in layout.items()}

    export_mod.write_safetensors_streaming(tmp_path / "x.safetensors", list(lazy.items()), torch.float32, {})
    assert all(torch.equal(v, full[k]) for k, v in load_file(str(tmp_path / "x.safetensors")).items())
    for dtype in (torch.float32, torch.bfloat16):
        export_mod.write_bin_shard(tmp_path / "x.bin", list(lazy.items()), dtype)
        for name, tensor in torch.load(tmp_path / "x.bin", weights_only=True).items():
            assert torch.equal(tensor, full[name].to(dtype))
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


def test_training_dtype_lookup(tmp_path: Path) -> None:
    assert export_mod.training_dtype(tmp_path) == "fp32"
    (tmp_path / "train_config.yaml").write_text("epochs: 2\n")
    assert export_mod.training_dtype(tmp_path) == "fp32"
    (tmp_path / "train_config.yaml").write_text("dtype: bf16\n")
    assert export_mod.training_dtype(tmp_path) == "bf16"
    (tmp_path / "train_config.yaml").write_text("dtype: int8\n")
    with pytest.raises(export_mod.ExportError, match="int8"):
        export_mod.training_dtype(tmp_path)


def test_failed_export_leaves_nothing(ckpt: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the first shard leaves neither OUT_DIR nor a temp folder beside it."""
    real = export_mod.write_safetensors_streaming
    calls = []

    def fail_second(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        real(*args, **kwargs)

    monkeypatch.setattr(export_mod, "write_safetensors_streaming", fail_second)
    with pytest.raises(OSError, match="disk full"):
        export_mod.export(ckpt["save"], tmp_path / "hf", dtype="fp32", max_shard_size=SMALL_SHARD)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_needs_overwrite(ckpt: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert export_mod.main([str(ckpt["save"]), str(out), "--dtype", "fp16"]) == 2
    assert (out / "old.txt").is_file()
    assert export_mod.main([str(ckpt["save"]), str(out), "--dtype", "fp16", "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    for inside in (ckpt["save"], ckpt["save"].parent):
        assert export_mod.main([str(ckpt["save"]), str(inside), "--overwrite"]) == 2
    assert (ckpt["save"] / "latest").is_file()


def test_tag_selects_checkpoint_and_bad_tag_is_named(ckpt: dict[str, Any], tmp_path: Path) -> None:
    tag = (ckpt["save"] / "latest").read_text().strip()
    assert export_mod.main([str(ckpt["save"]), str(tmp_path / "a"), "--tag", tag]) == 0
    assert export_mod.main([str(ckpt["save"]), str(tmp_path / "b"), "--tag", "global_step999"]) == 2
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tied_embeddings_named_once(tied_ckpt: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    """DeepSpeed lists a tied weight under both names; the index must name it once and still load."""
    out = tmp_path / "hf"
    argv = [str(tied_ckpt["save"]), str(out), "--dtype", "fp32", f"--{fmt}", "--max_shard_size", SMALL_SHARD]
    assert export_mod.main(argv) == 0
    weight_map = check_index(out, export_mod.INDEX_NAMES[fmt])
    assert "model.embed_tokens.weight" in weight_map and "lm_head.weight" not in weight_map
    model = load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits_of(model, tied_ckpt["input_ids"]), tied_ckpt["logits"], atol=1e-5, rtol=0)


def test_bf16_training_exports_bf16_by_default(bf16_ckpt: dict[str, Any], tmp_path: Path) -> None:
    """A bf16 run (train_config.yaml says so) exports bf16 by default, rounded from the fp32 master
    weights exactly as the engine rounds its bf16 working copy: the bf16 forward matches bit for bit.
    """
    out = tmp_path / "hf"
    assert export_mod.main([str(bf16_ckpt["save"]), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = load(out, dtype=None)
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(logits_of(model, bf16_ckpt["input_ids"]), bf16_ckpt["logits"], atol=0, rtol=0)


def test_make_shards_default_is_the_originals_5gb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other test passes a size or fits one shard either way: here the command as the seed
    README runs it (no --max_shard_size) must split at 5GB."""
    make_shards = load_script(REPO / "scripts" / "make_shards.py")
    sizes = []
    real = make_shards.save_torch_state_dict
    monkeypatch.setattr(make_shards, "save_torch_state_dict",
                        lambda *a, **kw: sizes.append(kw["max_shard_size"]) or real(*a, **kw))
    save = tmp_path / "save"
    save.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, save / "pytorch_model.bin")
    make_shards.main([str(save)])
    assert sizes == ["5GB"]
