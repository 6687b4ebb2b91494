"""Ask a fine-tuned OpenAlpaca model, with exactly the prompt it was trained on.

    python inference.py --instruction "What is an alpaca? How is it different from a llama?"
    python inference.py --instruction "Summarise the text." --input "..."
    python inference.py --interactive
    python inference.py --input_file questions.jsonl --output_file answers.jsonl

Interactive mode is a conversation: it reads one question per line and streams the answer as it
is generated, each question asked after the earlier questions and answers (as the model was
trained on conversations, and as the chat template renders them); ``/reset`` starts a new
conversation. A line is an instruction; ``INSTRUCTION ### Input: CONTEXT`` gives it a context
(the text after the first ``### Input:``, stripped; nothing after it means no context). An empty
line or Ctrl-D quits.

Sampling defaults are the seed's (top-k 50, top-p 0.9, 128 new tokens); ``--greedy`` decodes
deterministically. The prompt's token layout is the one the model was trained with, read from
``train_config.yaml`` in the model folder; a folder without one (such as the published
``openllmplayground/openalpaca_7b_preview_3bt``) gets the seed README's snippet, ``[1, 1, P, 2, 1]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from model.export import trained_layout
from model.hf_tokenizer import INPUT_MARK  # ``INSTRUCTION ### Input: CONTEXT``, as in the chat template
from model.llama import TORCH_DTYPES, ModelPathError, check_model_folder, load_model, load_tokenizer
from openalpaca.generate import Sampling, generate
from openalpaca.prompts import LAYOUTS, Exchange, split_user_content
from openalpaca.records import DataError, atomic_write, check_output, read_records

RESET = "/reset"  # interactive: forget the conversation so far


class UsageError(ValueError):
    """A bad command line, reported as one line (``error: ...``) and exit status 1."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own: the usage block and exit 2
        raise UsageError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default="./ckpt/openalpaca", help="HF folder (or hub id) of the fine-tuned model")
    mode = p.add_argument_group("mode (pick one)")
    mode.add_argument("--instruction", help="one instruction to answer")
    mode.add_argument("--interactive", action="store_true",
                      help=f"a conversation that streams tokens; 'INSTRUCTION {INPUT_MARK} CONTEXT' adds a context; "
                      f"{RESET} starts a new conversation; empty line exits")
    mode.add_argument("--input_file", help="Alpaca-format JSON or JSONL (instruction, optional input)")
    p.add_argument("--input", default="", help="optional context for --instruction")
    p.add_argument("--output_file", help="JSONL written by --input_file mode: each record plus 'generated'")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per forward pass in --input_file mode")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top_k", type=int, default=50, help="sample from the k most likely tokens")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible answers)")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="prompt token layout (default: the model folder's train_config.yaml, else original)")
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="fp32",
                   help="weights dtype (default fp32, as the seed's snippet; bf16 halves the memory on a GPU)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    args = p.parse_args(argv)
    if sum([args.instruction is not None, args.interactive, args.input_file is not None]) != 1:
        p.error("give exactly one of --instruction, --interactive, --input_file")
    if args.input_file and not args.output_file:
        p.error("--input_file needs --output_file")
    if args.output_file and not args.input_file:
        p.error("--output_file needs --input_file")
    if args.input and args.instruction is None:
        p.error("--input goes with --instruction (a file's records carry their own; interactive: "
                f"'INSTRUCTION {INPUT_MARK} CONTEXT')")
    for name, low, inclusive in (("max_new_tokens", 1, True), ("batch_size", 1, True), ("top_k", 0, True),
                                 ("temperature", 0, False), ("top_p", 0, False)):
        value = getattr(args, name)
        if value < low or (value == low and not inclusive):
            p.error(f"--{name} must be {'at least' if inclusive else 'greater than'} {low}, got {value}")
    if args.top_p > 1:
        p.error(f"--top_p must be at most 1, got {args.top_p}")
    return args


def load(args: argparse.Namespace):
    check_model_folder(args.model_path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(args.model_path)
    model = load_model(args.model_path, args.dtype).to(device)
    return model, tokenizer


def interactive(model, tokenizer, sampling: Sampling, layout: str) -> None:
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"Type an instruction, optionally followed by '{INPUT_MARK} CONTEXT'; each question follows the "
          f"conversation so far, {RESET} starts a new one (empty line or Ctrl-D to quit).", flush=True)
    history: list[Exchange] = []
    while True:
        try:
            line = input("\n### Instruction: ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == RESET:
            history = []
            print("(a new conversation)", flush=True)
            continue
        question = split_user_content(line)  # as the chat template reads a user message
        answer = generate(model, tokenizer, [question], sampling, batch_size=1, streamer=streamer, layout=layout,
                          histories=[history])[0]
        history.append(Exchange(*question, answer))


def read_questions(args: argparse.Namespace) -> list[dict]:
    """The --input_file records, checked (with the output's folder) before any model is loaded."""
    records = read_records(args.input_file, fields=("instruction",), optional=("input",))
    check_output(Path(args.output_file))
    return records


def answer_file(model, tokenizer, sampling: Sampling, records: list[dict], args: argparse.Namespace) -> None:
    out = Path(args.output_file)
    with tqdm(total=len(records), desc="generate", dynamic_ncols=True) as bar:
        answers = generate(model, tokenizer, [(r["instruction"], r["input"]) for r in records], sampling,
                           batch_size=args.batch_size, progress=bar.update, layout=args.layout)
    with atomic_write(out) as f:
        for record, answer in zip(records, answers, strict=True):
            f.write(json.dumps({**record, "generated": answer}, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} answers to {out}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    sampling = Sampling(args.max_new_tokens, args.greedy, args.temperature, args.top_k, args.top_p)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        records = read_questions(args) if args.input_file else None
        model, tokenizer = load(args)
        args.layout = args.layout or trained_layout(args.model_path)
        if args.interactive:
            interactive(model, tokenizer, sampling, args.layout)
        elif records is not None:
            answer_file(model, tokenizer, sampling, records, args)
        else:
            print(generate(model, tokenizer, [(args.instruction, args.input)], sampling, batch_size=1,
                           layout=args.layout)[0])
    except (ModelPathError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
