"""Serving a trained folder: an OpenAI-compatible API and a web chat page over it.

``serve.server`` runs ``transformers serve`` (generation, streaming, the models list are all
its own) with one thin ASGI layer in front that refuses bad chat requests with a 4xx before the
model sees them. ``serve.chat`` is a gradio page that talks to any OpenAI-compatible endpoint
(this server, or ``vllm serve FOLDER``) through the ``openai`` client.

It sits on top of ``model`` (folder checks) and is imported by nothing but its scripts
(``scripts/serve.sh``, ``scripts/chat.sh``), the benchmark and the tests.
"""
