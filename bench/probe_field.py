"""Variants of the demo's data for ``bench/probe_demo.py``: what makes the "field" task learnable.

The "field" task asks for the value of a named key (``- city: Oslo`` ... "What is the city?").
With the seed's template the context comes *before* the instruction, so the model cannot know
which key matters while it reads the fields. The demo's values are typed (a city field holds a
city), so the answer is the context word of the asked key's kind: learned in a few hundred steps.
With ``--field_values shared`` every key takes an animal (``- city: fox``, the demo before
session 4): the model then has to carry each key to its value and match later (associative
recall), and no variant below made that learnable within the demo's budget. This script re-runs
the probe with the field task changed in one way at a time, so the README's figures can be
reproduced (every flag below is one that was measured):

    P=".venv/bin/python bench/probe_field.py --threads 1 --vocab_size 1024 --lr 7e-4"
    $P --only field --steps 400 --n_train 12800 --eval_every 100                   # typed: 1.00; shared: 0.43
    $P --only field --field_values shared --steps 1200 --n_train 38400 --eval_every 200
    $P --only field --field_values shared --field_format adjacent_cap --steps 600 --n_train 19200
    $P --only field --field_values shared --field_keys 2,2 --steps 600 --n_train 19200
    $P --field_values shared --phases "12800:;17920:add=2.5,field=2.5,nth=2" --no_shuffle --steps 960 --n_train 30720

Flags it does not know go to ``bench/probe_demo.py`` unchanged (``--only TASK`` becomes weights
that keep only TASK). The demo's own data is never changed by this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_demo  # noqa: E402
import transformers  # noqa: E402

from openalpaca import synthetic  # noqa: E402

FORMATS = {
    "colon": ("- {key}: {value}", lambda line: line[2:].split(": ")),  # the demo's
    "cap": ("- {Key}: {value}", lambda line: line[2:].split(": ")),  # key tokens differ from the question's
    "adjacent": ("- {key} {value}", lambda line: line[2:].split(" ")),  # value right after its key
    "adjacent_cap": ("- {Key} {value}", lambda line: line[2:].split(" ")),
    "value_first": ("- {value} is the {key}", lambda line: line[2:].split(" is the ")[::-1]),
}


def patch_field_format(name: str) -> None:
    template, parse = FORMATS[name]
    synthetic.field_context = lambda fields: "\n".join(
        template.format(key=k, Key=k.capitalize(), value=v) for k, v in fields
    )
    synthetic.context_fields = lambda context: {
        key.lower(): value for key, value in (parse(line) for line in context.split("\n"))
    }
    if "Key" in template:
        vocabulary = synthetic.vocabulary
        synthetic.vocabulary = lambda: [*vocabulary(), *(k.capitalize() for k in synthetic.KEYS)]


def patch_shared_values() -> None:
    """Field values drawn from the shared animal list (``- city: fox``), as before the demo typed them:
    the key then only binds to its value by position, pure associative recall."""

    def shared(rng):
        lo, hi = synthetic.LIST_LENGTHS["field"]
        keys = rng.sample(synthetic.KEYS, rng.randint(lo, hi))
        values = rng.sample(synthetic.WORDS, len(keys))
        key = rng.choice(keys)
        return {"key": key}, synthetic.field_context(zip(keys, values)), values[keys.index(key)]

    synthetic.GENERATORS["field"] = shared


def patch_line_answer() -> None:
    """The answer repeats the whole field line, ``color: fox``: the value is then predicted right
    after its key, as an induction head would copy it."""
    generate = synthetic.GENERATORS["field"]

    def line(rng):
        slots, context, value = generate(rng)
        return slots, context, f"{slots['key']}: {value}"

    synthetic.GENERATORS["field"] = line


def patch_phases(phases: str) -> None:
    """Train records in phases, e.g. ``"12800:;17920:add=2.5,field=2.5"``: N samples with that task
    mix each, concatenated in order (use ``--no_shuffle`` so the probe keeps the order)."""
    make_split = synthetic.make_split

    def phased(n, split, seed=0, tasks=synthetic.TASKS, weights=None):
        if split != "train":
            return make_split(n, split, seed, tasks, weights)
        records = []
        for i, phase in enumerate(phases.split(";")):
            count, _, mix = phase.partition(":")
            records += make_split(int(count), "train", seed * 100 + i, tasks, synthetic.parse_weights(mix))
        return records

    synthetic.make_split = phased


def scale_qk_init(scale: float) -> None:
    """Multiply the random init of every q_proj and k_proj by ``scale`` (sharper attention at step 0)."""
    base = transformers.LlamaForCausalLM

    class Scaled(base):
        def __init__(self, config):
            super().__init__(config)
            with torch.no_grad():
                for name, param in self.named_parameters():
                    if name.endswith(("q_proj.weight", "k_proj.weight")):
                        param.mul_(scale)

    probe_demo.LlamaForCausalLM = Scaled


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--field_format", choices=sorted(FORMATS), default="colon")
    p.add_argument("--field_values", choices=("typed", "shared"), default="typed",
                   help="typed: each key's own kind of value (the demo's); shared: animals for every key")
    p.add_argument("--field_answer", choices=("value", "line"), default="value")
    p.add_argument("--field_keys", default="", help="LO,HI fields per context (the demo: 2,4)")
    p.add_argument("--qk_init_scale", type=float, default=1.0)
    p.add_argument("--phases", default="", help='e.g. "12800:;17920:field=2.5" (samples:task mix; ...)')
    p.add_argument("--only", default="", help="train on this one task kind only")
    args, rest = p.parse_known_args(argv)
    patch_field_format(args.field_format)
    if args.field_values == "shared":
        patch_shared_values()
    if args.field_answer == "line":
        patch_line_answer()
    if args.field_keys:
        lo, hi = (int(n) for n in args.field_keys.split(","))
        synthetic.LIST_LENGTHS["field"] = (lo, hi)
    if args.qk_init_scale != 1.0:
        scale_qk_init(args.qk_init_scale)
    if args.phases:
        patch_phases(args.phases)
    if args.only:
        rest += ["--weights", ",".join(f"{t}={int(t == args.only)}" for t in synthetic.TASKS)]
    return probe_demo.main(rest)


if __name__ == "__main__":
    main()
