"""The demo's score for lm-eval: ``demo/synthetic.py``'s ``exact_match`` (kept in step by tests/test_eval.py).

lm-eval loads this file by its path, so it imports nothing from the repository.
"""


def exact_match(prediction: str, reference: str) -> bool:
    """The whole answer equals the reference after stripping whitespace at both ends, as the demo scores it."""
    return prediction.strip() == reference.strip()


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """One held-out record: ``results`` holds the one greedy generation (cut at eos by lm-eval)."""
    return {"exact_match": float(exact_match(results[0], doc["response"]))}
