"""Build a small DeepSpeed ZeRO-3 engine, train it a few steps and save a checkpoint like the trainer.

The export tests and ``bench/export_memory.py`` need a *real* ZeRO-3 checkpoint (rank files,
``latest``, the files the trainer copies beside them) rather than a hand-made imitation, because
the point is to read exactly what ``engine.save_checkpoint`` writes.

DeepSpeed's process group is global to a process, so callers run this module as a child process
(``python tests/helpers_engine.py ...`` or under ``torchrun``) instead of importing and calling
``build_engine`` inside pytest: other test files initialise DeepSpeed with other settings, and a
child also hands its memory back when it exits. ``make_trained_checkpoint`` does the launching.

With ``--logits FILE`` the child also saves the engine's logits on a fixed input, computed by the
ZeRO-3 engine itself (its forward gathers the partitioned parameters): the reference every export
is compared against.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from model.export import MODEL_FILES  # noqa: E402
from model.llama import generation_config  # noqa: E402
from model.tokenizer import TOKENIZER_FILES  # noqa: E402


def free_port() -> int:
    """A TCP port that was free a moment ago, for MASTER_PORT of a one-process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def single_process_env(port: int | None = None) -> dict[str, str]:
    """Environment for a one-rank DeepSpeed run without a launcher (else it tries mpi4py)."""
    env = dict(os.environ)
    env.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port or free_port()),
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
    )
    return env


def ds_config(dtype: str = "fp32", lr: float = 1e-2, micro_batch: int = 2, world_size: int = 1) -> dict[str, Any]:
    """A ZeRO-3 config shaped like ``dsconfig/openllama.json`` with concrete numbers.

    The persistence threshold is low so a tiny model has both kinds of parameters: partitioned
    matrices and small persistent ones (norms), which the checkpoint stores differently.
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": 1.0,
        "steps_per_print": 1_000_000,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 100,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": False},
    }


def build_engine(model_dir: str | Path, config: dict[str, Any], from_config: bool = False) -> Any:
    """A ZeRO-3 engine on the LLaMA in ``model_dir``, partitioned as it is built.

    ``HfDeepSpeedConfig`` must be alive while the model is built (transformers then builds it
    inside ``deepspeed.zero.Init``) and is dropped afterwards so it does not leak into later
    model loads. ``from_config`` builds random weights from config.json alone (the benchmark's
    big model has no weight files to read).
    """
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = torch.bfloat16 if config["bf16"]["enabled"] else torch.float32
    hf_ds = HfDeepSpeedConfig(config)
    if from_config:
        model = LlamaForCausalLM._from_config(LlamaConfig.from_pretrained(str(model_dir)), dtype=dtype)
    else:
        model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    del hf_ds
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def copy_trainer_files(model_dir: str | Path, save_path: str | Path, dtype: str) -> None:
    """Put beside the rank files what the trainer puts there: config, tokenizer, train config, converter.

    Called after ``save_checkpoint``, which copies DeepSpeed's own ``zero_to_fp32.py`` into the
    save path on every save; ours must land on top of it.
    """
    model_dir, save_path = Path(model_dir), Path(save_path)
    for name in (*MODEL_FILES, *TOKENIZER_FILES):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, save_path / name)
    generation_config().save_pretrained(save_path)  # the trainer's: the original's sampling
    (save_path / "train_config.yaml").write_text(f"dtype: {dtype}\nsave_path: {save_path}\n")
    shutil.copy2(REPO / "scripts" / "zero_to_fp32.py", save_path / "zero_to_fp32.py")


def train_and_save(
    model_dir: str | Path,
    save_path: str | Path,
    logits_path: str | Path | None,
    steps: int = 3,
    dtype: str = "fp32",
    seed: int = 0,
    from_config: bool = False,
    seq_len: int = 16,
) -> None:
    """Train ``steps`` steps on random ids, record the engine's logits, save like the trainer."""
    import torch
    import torch.distributed as dist

    from openalpaca.distributed import init_distributed

    init_distributed(dist_backend="gloo")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    engine = build_engine(model_dir, ds_config(dtype, world_size=world_size), from_config=from_config)
    vocab = engine.module.config.vocab_size
    micro = engine.train_micro_batch_size_per_gpu()
    gen = torch.Generator().manual_seed(seed + rank)
    engine.train()
    for _ in range(steps):
        ids = torch.randint(3, vocab, (micro, seq_len), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    if logits_path is not None:
        engine.eval()
        probe = torch.randint(3, vocab, (2, seq_len), generator=torch.Generator().manual_seed(seed + 1000))
        with torch.no_grad():
            logits = engine(input_ids=probe).logits.float()
    engine.save_checkpoint(str(save_path))
    dist.barrier()
    if rank == 0:
        copy_trainer_files(model_dir, save_path, dtype)
        if logits_path is not None:
            torch.save({"input_ids": probe, "logits": logits}, str(logits_path))


Job = tuple[str | Path, str | Path, str | Path | None]  # (model_dir, save_path, logits_path or None)


def make_trained_checkpoint(
    model_dir: str | Path, save_path: str | Path, logits_path: str | Path | None, **options: Any
) -> None:
    """One checkpoint; see ``make_trained_checkpoints`` for the options."""
    make_trained_checkpoints([(model_dir, save_path, logits_path)], **options)


def make_trained_checkpoints(
    jobs: list[Job],
    steps: int = 3,
    dtype: str | list[str] = "fp32",
    nproc: int = 1,
    from_config: bool = False,
    seq_len: int = 16,
    timeout: float | None = 300,
) -> None:
    """Run ``train_and_save`` for each job, one after the other, in ONE child process group.

    ``dtype`` is the training dtype of every job, or a list with one per job.

    One child for several checkpoints saves an interpreter start and a process-group setup per
    extra checkpoint (most of the cost for tiny models). ``nproc`` > 1 runs the child as that
    many ranks under torchrun: every weight is then split into per-rank slices (padded when its
    size does not divide evenly), the layout a multi-GPU training run leaves.
    """
    dtypes = [dtype] * len(jobs) if isinstance(dtype, str) else list(dtype)
    script_args = [str(Path(__file__).resolve())]
    for (model_dir, save_path, logits_path), job_dtype in zip(jobs, dtypes, strict=True):
        script_args += ["--model_dir", str(Path(model_dir).resolve()), "--save_path", str(Path(save_path).resolve())]
        script_args += ["--logits", str(Path(logits_path).resolve()) if logits_path is not None else ""]
        script_args += ["--dtype", job_dtype]
    script_args += ["--steps", str(steps), "--seq_len", str(seq_len)]
    if from_config:
        script_args.append("--from_config")
    if nproc == 1:
        cmd, env = [sys.executable, *script_args], single_process_env()
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), *script_args]
        launcher_sets = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in single_process_env().items() if k not in launcher_sets}
    done = subprocess.run(cmd, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"engine child failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model_dir",
        action="append",
        required=True,
        help="HF LLaMA folder (config.json, tokenizer, weights); repeat with --save_path/--logits for more checkpoints",
    )
    parser.add_argument(
        "--save_path",
        action="append",
        required=True,
        help="where engine.save_checkpoint writes, as the trainer's --save_path (one per --model_dir)",
    )
    parser.add_argument(
        "--logits",
        action="append",
        default=None,
        help="file for the engine's probe input ids and logits, written by rank 0; '' for none (one per --model_dir)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="training steps before saving, so weights differ from init"
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=("fp32", "bf16"),
        default=None,
        help="training dtype, fp32 by default (fp16 fails on CPU); once for all --model_dir or once per --model_dir",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random training ids and of the probe input")
    parser.add_argument(
        "--from_config", action="store_true", help="random weights from config.json alone (no weight files read)"
    )
    parser.add_argument("--seq_len", type=int, default=16, help="tokens per training sample and probe row")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher; unused")
    args = parser.parse_args(argv)
    args.logits = args.logits or [""] * len(args.model_dir)
    args.dtype = args.dtype or ["fp32"]
    if len(args.dtype) == 1:
        args.dtype = args.dtype * len(args.model_dir)
    if not len(args.model_dir) == len(args.save_path) == len(args.logits) == len(args.dtype):
        parser.error("give --save_path (and --logits, --dtype if any) once per --model_dir")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    jobs = zip(args.model_dir, args.save_path, args.logits, args.dtype, strict=True)
    for model_dir, save_path, logits, dtype in jobs:
        Path(save_path).mkdir(parents=True, exist_ok=True)
        train_and_save(
            model_dir,
            save_path,
            logits or None,
            steps=args.steps,
            dtype=dtype,
            seed=args.seed,
            from_config=args.from_config,
            seq_len=args.seq_len,
        )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
