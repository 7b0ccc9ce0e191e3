"""The OpenAI-compatible HTTP server: `/v1/completions`, `/v1/chat/completions` (streamed as
server-sent events or not), `/v1/models`, `/health` and `/metrics`, over one shared `LLM`, with
a formula per request (a preset named by `model`, or the `formula` field of the body).

protocol.py: the request and response bodies (pydantic); serving.py: requests -> engine calls
-> response bodies and SSE chunks; errors.py: lmarith errors -> HTTP errors; metrics.py:
Prometheus; server.py: `build_app` and `run_server`."""
from .server import build_app, run_server

__all__ = ["build_app", "run_server"]
