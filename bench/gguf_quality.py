"""Quality and size of each GGUF type: the CPU demo's held-out exact match through PyTorch fp32 and GGUF files.

Usage (after ``bash scripts/demo.sh``; ~1-2 minutes on 2 cores)::

    .venv/bin/python bench/gguf_quality.py [--model ckpt/demo/openalpaca] [--heldout ckpt/demo/data/heldout.jsonl]
                                           [--types f32,f16,q8_0,q4_k_m] [--max_new_tokens 24]

What runs: the demo's scorer (``demo.synthetic.score``: whole-answer exact match per record) on the
demo's greedy answers, first through PyTorch fp32 exactly as ``scripts/demo.sh`` scores them
(``demo.evaluate.greedy_predictions``: the inference code path), then for each type a GGUF that
``scripts/export_gguf.sh``'s code writes to a temp folder, answered through the project's GGUF
engine without HTTP: llama-cpp-python's ``Llama`` with the training tokenizer attached
(``serve.llamacpp.attach_tokenizer``), ``create_chat_completion`` on the user message
``INSTRUCTION ### Input: CONTEXT`` (the GGUF's chat template), greedy, with the engine's defaults
otherwise. Sizes are the files' bytes (the PyTorch figure: the folder's weight files);
``same_answer_as_pytorch`` counts the records whose answer (stripped) is PyTorch's. The last line
is JSON; ``q8_0_minus_fp32`` is the goal's difference (goal: within 0.01).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo import synthetic  # noqa: E402


def pytorch_answers(model: Path, records: list[dict], max_new_tokens: int) -> list[str]:
    from demo.evaluate import greedy_predictions
    from model.export import trained_layout
    from model.llama import load_model, load_tokenizer

    return greedy_predictions(load_model(model), load_tokenizer(model), records, max_new_tokens=max_new_tokens,
                              layout=trained_layout(model))


def gguf_answers(path: Path, records: list[dict], max_new_tokens: int) -> list[str]:
    import llama_cpp

    from model.gguf import read_metadata
    from serve.llamacpp import attach_tokenizer, request_defaults

    meta = read_metadata(path)
    llm = llama_cpp.Llama(str(path), n_ctx=int(meta["llama.context_length"]), verbose=False)
    attach_tokenizer(llm, str(path), meta)
    defaults = {**request_defaults(meta), "temperature": 0.0, "max_tokens": max_new_tokens}
    answers = []
    for record in records:
        content = record["instruction"] + (f" ### Input: {record['context']}" if record.get("context") else "")
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": content}], **defaults)
        answers.append(reply["choices"][0]["message"]["content"] or "")
    llm.close()
    return answers


def mib(paths) -> float:
    return round(sum(p.stat().st_size for p in paths) / 2**20, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("ckpt/demo/openalpaca"), help="the demo's fine-tuned model")
    p.add_argument("--heldout", type=Path, default=Path("ckpt/demo/data/heldout.jsonl"), help="held-out records")
    p.add_argument("--types", default="f32,f16,q8_0,q4_k_m", help="GGUF types (default f32,f16,q8_0,q4_k_m)")
    p.add_argument("--max_new_tokens", type=int, default=24, help="longest answer (default 24, as the demo)")
    args = p.parse_args(argv)
    for path in (args.model, args.heldout):
        if not path.exists():
            sys.exit(f"error: {path}: not found (bash scripts/demo.sh writes ckpt/demo/)")
    from model.gguf import export_gguf, parse_types

    load = os.getloadavg()
    records = synthetic.read_jsonl(args.heldout)
    weights = [f for f in args.model.iterdir() if f.suffix in (".safetensors", ".bin")]
    reference = pytorch_answers(args.model, records, args.max_new_tokens)
    score, _ = synthetic.score(records, reference)
    result = {"pytorch_fp32": {"exact_match": round(score, 4), "mib": mib(weights)}}
    types = parse_types(args.types)
    with tempfile.TemporaryDirectory() as tmp:
        files = export_gguf(args.model, out=str(Path(tmp) / "demo-{type}.gguf"), types=types)
        for qtype, path in files.items():
            answers = gguf_answers(path, records, args.max_new_tokens)
            score, _ = synthetic.score(records, answers)
            same = sum(a.strip() == b.strip() for a, b in zip(answers, reference, strict=True))
            result[qtype] = {"exact_match": round(score, 4), "mib": mib([path]), "same_answer_as_pytorch": same}
            print(json.dumps({qtype: result[qtype]}), file=sys.stderr)
    line = {"bench": "gguf_quality", "model": str(args.model), "heldout": len(records), "results": result,
            "load_average_at_start": [round(x, 2) for x in load]}
    if "q8_0" in result:
        line["q8_0_minus_fp32"] = round(result["q8_0"]["exact_match"] - result["pytorch_fp32"]["exact_match"], 4)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
