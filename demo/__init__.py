"""The CPU demo: synthetic instruction tasks, a tiny random LLaMA, and held-out exact match.

It sits on top of the project (it imports ``model`` and ``openalpaca``; nothing imports it but
the tests and ``scripts/demo.sh``). ``python -m demo base|eval``, ``python -m demo.synthetic``.
"""
