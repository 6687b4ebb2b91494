"""The two steps of the CPU demo that stand in for what a real run downloads or eyeballs.

``base``  writes the base model: a sentencepiece tokenizer trained on the synthetic data's
          words (one token per word) and a tiny random-init LLaMA, as an HF folder shaped
          like ``openllama_ckpt/``.
``eval``  scores held-out exact match with greedy decoding through ``openalpaca.generate``
          (the inference code path, the training prompt), for the base model and the
          fine-tuned one, and ends with ``held-out exact match: X (before training: Y)``;
          with held-out conversations, the second turns' exact match comes on the line before.
          ``--report FILE`` also writes the figures as JSON.
``check`` fails (one line, exit 1) when a report's figures are below the given floors (CI).

Everything else in ``scripts/demo.sh`` is the real pipeline, unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from demo import synthetic
from demo.evaluate import greedy_predictions, second_turn_predictions
from demo.tiny import llama_config, tokenizer_vocab_size, train_tokenizer, write_tiny_llama
from model.export import trained_layout
from model.llama import load_model, load_tokenizer
from openalpaca.records import write_json_atomic


def make_base(out_dir: Path, hidden_size: int, num_layers: int, num_heads: int, vocab_size: int, seed: int) -> None:
    train_tokenizer(synthetic.corpus_texts(seed=seed), out_dir, vocab_size)
    config = llama_config(tokenizer_vocab_size(out_dir), hidden_size, num_layers, num_heads,
                          max_position_embeddings=512)
    write_tiny_llama(out_dir, config, seed=seed)
    n_params = sum(p.numel() for p in load_model(out_dir).parameters())
    print(f"base model: {out_dir} (vocab {config.vocab_size}, hidden {hidden_size} x {num_layers} layers, "
          f"{n_params / 1e6:.2f}M parameters)")


def predict(model_path: Path, records: Sequence[dict], chats: Sequence[dict], batch_size: int, max_new_tokens: int,
            layout: str) -> tuple[list[str], list[str]]:
    """One model's greedy answers, loaded once: to each held-out record, and to each conversation's second question."""
    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    return (greedy_predictions(model, tokenizer, records, batch_size, max_new_tokens, layout),
            second_turn_predictions(model, tokenizer, chats, batch_size, max_new_tokens, layout) if chats else [])


def second_turn_records(chats: Sequence[dict]) -> list[dict[str, str]]:
    """What ``synthetic.score`` reads: each conversation's category and its second answer."""
    return [{"category": c["category"], "response": c["messages"][3]["content"]} for c in chats]


def evaluate(base: Path, trained: Path, heldout: Path, batch_size: int, max_new_tokens: int, show: int,
             started_at: float | None = None, heldout_chats: Path | None = None, report: Path | None = None) -> None:
    records = synthetic.read_jsonl(heldout)
    chats = synthetic.read_jsonl(heldout_chats) if heldout_chats is not None else []
    layout = trained_layout(trained)  # the base model is asked in the same layout
    predictions_before, answers_before = predict(base, records, chats, batch_size, max_new_tokens, layout)
    predictions, answers = predict(trained, records, chats, batch_size, max_new_tokens, layout)
    before, _ = synthetic.score(records, predictions_before)
    after, per_task = synthetic.score(records, predictions)
    for record, prediction in list(zip(records, predictions, strict=True))[:show]:
        context = f" [{record['context']}]" if record["context"] else ""
        mark = "ok " if synthetic.exact_match(prediction, record["response"]) else "BAD"
        print(f"{mark} {record['instruction']}{context} -> {prediction!r} (expected {record['response']!r})")
    counts = {task: sum(r["category"] == task for r in records) for task in per_task}
    if heldout_chats is not None:
        references = second_turn_records(chats)
        chat_before, _ = synthetic.score(references, answers_before)
        chat_after, per_chat = synthetic.score(references, answers)
        for chat, answer in list(zip(chats, answers, strict=True))[: max(1, show // 2)]:
            m = [x["content"] for x in chat["messages"]]
            mark = "ok " if synthetic.exact_match(answer, m[3]) else "BAD"
            print(f"{mark} {m[0]} -> {m[1]!r}; {m[2]} -> {answer!r} (expected {m[3]!r})")
        per_task.update({f"{task} (2nd)": v for task, v in per_chat.items()})
        counts.update({f"{task} (2nd)": sum(c["category"] == task for c in chats) for task in per_chat})
    print(f"\n{'task':20s} {'n':>4s} {'exact match':>12s}")
    for task in sorted(per_task):
        print(f"{task:20s} {counts[task]:4d} {per_task[task]:12.2f}")
    figures = {"exact_match": after, "exact_match_before": before, "per_task": per_task}
    if heldout_chats is not None:
        figures.update(second_turn_exact_match=chat_after, second_turn_exact_match_before=chat_before)
    if started_at is not None:
        figures["wall_seconds"] = time.time() - started_at
        print(f"demo wall time: {figures['wall_seconds']:.0f}s")
    if report is not None:
        write_json_atomic(figures, report)
    if heldout_chats is not None:
        print(f"held-out second-turn exact match: {chat_after:.2f} (before training: {chat_before:.2f})")
    print(f"held-out exact match: {after:.2f} (before training: {before:.2f})")


def check(report: Path, floors: dict[str, float]) -> int:
    """0 when every figure of ``report`` reaches its floor; else one line naming the first that does not."""
    try:
        figures = json.loads(report.read_text())
    except (OSError, ValueError) as err:
        print(f"error: {report}: not a readable report ({err})", file=sys.stderr)
        return 1
    for key, floor in floors.items():
        if key not in figures:
            print(f"error: {report}: no {key}", file=sys.stderr)
            return 1
        if round(figures[key], 2) < floor:
            print(f"error: {report}: {key} {figures[key]:.2f} is below {floor:.2f}", file=sys.stderr)
            return 1
    print(f"{report}: " + ", ".join(f"{k} {figures[k]:.2f} >= {v:.2f}" for k, v in floors.items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("base", help="write the tokenizer and a random-init tiny LLaMA")
    b.add_argument("--out_dir", type=Path, required=True, help="folder to write (like openllama_ckpt/)")
    b.add_argument("--hidden_size", type=int, default=128, help="model width")
    b.add_argument("--num_layers", type=int, default=4, help="decoder layers")
    b.add_argument("--num_heads", type=int, default=4, help="attention heads")
    b.add_argument("--vocab_size", type=int, default=synthetic.TOKENIZER_VOCAB_SIZE,
                   help="upper bound on the tokenizer's vocabulary")
    b.add_argument("--seed", type=int, default=0, help="seed of the tokenizer corpus and the weights")
    e = sub.add_parser("eval", help="held-out exact match before and after training")
    e.add_argument("--base", type=Path, required=True, help="the base model folder")
    e.add_argument("--trained", type=Path, required=True, help="the fine-tuned HF folder")
    e.add_argument("--heldout", type=Path, required=True, help="held-out records (dolly JSONL)")
    e.add_argument("--batch_size", type=int, default=64, help="prompts per generate call")
    e.add_argument("--max_new_tokens", type=int, default=24, help="longest answer, in tokens")
    e.add_argument("--show", type=int, default=8, help="sample generations to print")
    e.add_argument("--heldout_chats", type=Path, default=None,
                   help="held-out two-turn conversations (messages JSONL): second-turn exact match")
    e.add_argument("--started_at", type=float, default=None, help="unix time the demo started (prints wall time)")
    e.add_argument("--report", type=Path, default=None, help="write the figures here as JSON")
    c = sub.add_parser("check", help="exit 1 when a report's figures are below their floors (CI)")
    c.add_argument("report", type=Path, help="the JSON that eval --report wrote")
    c.add_argument("--exact_match", type=float, default=0.96, help="floor of the one-turn held-out exact match")
    c.add_argument("--second_turn_exact_match", type=float, default=0.90,
                   help="floor of the held-out second turns' exact match")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check(args.report, {"exact_match": args.exact_match,
                                   "second_turn_exact_match": args.second_turn_exact_match})
    if args.command == "base":
        make_base(args.out_dir, args.hidden_size, args.num_layers, args.num_heads, args.vocab_size, args.seed)
    else:
        evaluate(args.base, args.trained, args.heldout, args.batch_size, args.max_new_tokens, args.show,
                 args.started_at, args.heldout_chats, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
