"""`lmarith serve`: an OpenAI-compatible HTTP server over named models and formula presets."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from lmarith.entrypoints.cli_common import (UsageError, add_engine_flags, add_model_flag,
                                            engine_kwargs, port_number, positive_int)

API_KEY_ENV = "LMARITH_API_KEY"
EPILOG = f"""\
Every --model (and any model a preset names by path) is loaded before the server starts.
A request's "model" field names a preset (with no --preset, each model is a preset of its own
name: its bare term); a request may also carry its own formula text in the body's "formula"
field, over the same models. The API key may also come from ${API_KEY_ENV}.
Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

examples:
  lmarith serve --port 8000
  lmarith serve --host 0.0.0.0 --model smol=./smollm2-dir --model big=./big.gguf:bfloat16 \\
      --preset polite="M('You are polite.') - 0.5*M('You are rude.')" \\
      --preset mix="M() + 0.5*M(model='big')" --api-key secret --kv-cache-bytes 4G
  lmarith serve --host 0.0.0.0 --ray-replicas 4 --model smol=./smollm2-dir
"""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `serve` and its flags on the subcommand set."""
    parser = commands.add_parser(
        "serve", parents=parents, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="serve models and formulas over an OpenAI-compatible HTTP API", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000)")
    add_model_flag(parser)
    parser.add_argument(
        "--preset", action="append", default=[], metavar="NAME=FORMULA",
        help="a named formula clients select with \"model\": NAME (repeatable), e.g. "
             "polite=\"M('You are polite.') - 0.5*M('You are rude.')\"; none: one preset per model")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every /v1 request "
                             f"(default: ${API_KEY_ENV}, else no key)")
    parser.add_argument("--ray-replicas", type=positive_int, default=None, metavar="N",
                        help="serve N replicas behind Ray Serve, each loading its own engine "
                             "(needs: pip install \"lmarith[ray]\"; joins the Ray cluster in "
                             "$RAY_ADDRESS, else starts a local one)")
    add_engine_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Parse the flags (nothing loads before they are valid), load every model, serve."""
    import lmarith as la
    from lmarith.entrypoints.arguments import models_to_load, parse_model_flags, parse_preset_flags

    models = parse_model_flags(args.model)
    presets = parse_preset_flags(args.preset, models)
    if args.ray_replicas:
        from lmarith.entrypoints.ray_serve import run_ray_server
        run_ray_server(models, presets, args.host, args.port, args.ray_replicas, args.api_key,
                       **engine_kwargs(args))
        return 0
    try:
        from lmarith.entrypoints.openai.server import run_server
    except ImportError as error:
        raise UsageError(f"the server cannot start: {error} (pip install -r requirements.txt "
                         "installs fastapi and uvicorn)") from error
    llm = la.LLM(models=models_to_load(models, presets), **engine_kwargs(args))
    try:
        print(f"lmarith: models {', '.join(models)}; presets {', '.join(presets)}; "
              f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        run_server(llm, models, presets, args.host, args.port, args.api_key)
    finally:
        llm.close()
    return 0
