"""Joining DeepSpeed's process group, shared by the trainer and the test/bench engine helpers."""

from __future__ import annotations


def init_distributed(dist_backend: str | None = None) -> None:
    """``deepspeed.init_distributed``, without DeepSpeed's CPU shared-memory op.

    On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce (``deepspeed_shm_comm``)
    the first time any process joins a group: 20 to 100 s of two cores, under a file lock in
    ``~/.cache/torch_extensions``. A process killed while it holds that lock (a test timeout, a
    Ctrl-C during the first start) leaves the lock behind, and every later start then waits on it
    forever (seen here and in CI). The op only serves ``inference_all_reduce``, which training never
    calls: every training collective goes through gloo. So on CPU it is not built at all; on a GPU
    nothing changes.
    """
    import importlib

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # Not ``import deepspeed.comm.torch``: the name ``torch`` inside ``deepspeed.comm`` is PyTorch.
    backend_module = importlib.import_module("deepspeed.comm.torch")
    if get_accelerator().device_name() == "cpu":
        backend_module.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist_backend)  # None: DeepSpeed picks (gloo on CPU)
