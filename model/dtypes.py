"""The training dtypes by their config names (``dtype: bf16``), in torch and in config.json."""

CONFIG_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # config.json's torch_dtype


def __getattr__(name: str):
    """``TORCH_DTYPES`` imports torch when first asked for: the GGUF server reads the names without torch."""
    if name == "TORCH_DTYPES":
        import torch

        globals()[name] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
