"""Starts the OpenAI-compatible server on tiny models for tests/server (a separate process, as
`lmarith serve` would run it):

    python launch_openai_server.py PORT DIR_A DIR_B DIR_PLAIN [API_KEY]

build() gives the models and presets, so the tests can compute their expectations in-process
on the same model directories with the same formulas."""
from __future__ import annotations

import sys

LLM_SETTINGS = dict(kv_cache_bytes=1 << 20, max_num_seqs=64)   # 128 pages of 16 tokens


def build(dir_a, dir_b, dir_plain):
    """models: tiny and tiny-b (tokenizer with a chat template), plain (no chat template);
    presets: each model bare, a 3-term mix, and a 2-term chat formula."""
    import lmarith as la

    a, b, plain = la.Model(str(dir_a)), la.Model(str(dir_b)), la.Model(str(dir_plain))
    models = {"tiny": a, "tiny-b": b, "plain": plain}
    presets = {"tiny": a, "tiny-b": b, "plain": plain,
               "mix": a.prompt("You are helpful.") + 0.5 * la.Union(b.prompt("You are rude."), a),
               "chat": a.chat("You are a pirate.") + 0.5 * b.chat()}
    return models, presets


def main(argv: list[str]) -> None:
    import lmarith as la
    from lmarith.entrypoints.openai.server import run_server

    port, dirs = int(argv[1]), argv[2:5]
    api_key = argv[5] if len(argv) > 5 else None
    models, presets = build(*dirs)
    llm = la.LLM(**LLM_SETTINGS, models=list(models.values()))
    run_server(llm, models, presets, "127.0.0.1", port, api_key=api_key, log_level="warning")


if __name__ == "__main__":
    main(sys.argv)
