"""The `lmarith` command (also `python -m lmarith`): generate text with a formula, serve an
OpenAI-compatible API, run the benchmarks, or run the built-in demo."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from lmarith.entrypoints import cli_bench, cli_generate, cli_serve
from lmarith.entrypoints.cli_common import UsageError, apply_quiet, quiet_parent

EPILOG = """\
`lmarith COMMAND --help` documents each command's flags, with examples.
Errors print one line, "error: ...", on stderr and exit with status 2.

examples:
  lmarith generate --temperature 0 "The capital of France is"
  lmarith serve --port 8000 --preset polite="M('You are polite.') - 0.5*M('You are rude.')"
  lmarith bench latency --plot latency.png
"""


def _demo(args: argparse.Namespace) -> int:
    import lmarith as la
    from lmarith.embedded import embedded_model

    model = embedded_model(args.dtype)
    helpful = model.prompt("You are a helpful assistant.")
    concise = model.prompt("You answer in one short sentence.")
    poet = model.prompt("You are a poet who loves nature.")
    formula = helpful + 0.5 * la.Union(concise, poet)
    print(f"formula: {formula}", flush=True)
    start = time.perf_counter()
    outputs = _generate(formula, args.prompt, args)
    elapsed = time.perf_counter() - start
    for prompt, output in zip(args.prompt, outputs):
        print(f"\n>>> {prompt}\n{output.text}\n[{len(output.token_ids)} tokens, {output.finish_reason}]")
    print(f"\n{sum(len(o.token_ids) for o in outputs)} tokens in {elapsed:.1f} s ({args.backend})")
    return 0


def _generate(formula, prompts, args):
    if args.backend == "reference":
        from lmarith import reference
        return reference.generate(formula, prompts, args.max_tokens, temperature=args.temperature,
                                  seed=args.seed)
    import lmarith as la
    llm = la.LLM()
    params = la.SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    return llm.generate(prompts, formula, params)


def _add_demo(commands, parents: list[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo", parents=parents, help="generate with a 3-term formula on the embedded SmolLM2",
        description="Generate with helpful + 0.5 * Union(concise, poet) on the embedded "
                    "SmolLM2-135M-Instruct, printing the formula, the text and the speed.",
        epilog="examples:\n  lmarith demo\n  lmarith demo --backend reference --max-tokens 8 "
               "\"Tell me about cats.\"", formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("prompt", nargs="*", default=["The capital of France is"],
                      help="the prompts (default: \"The capital of France is\")")
    demo.add_argument("--max-tokens", type=int, default=24, help="tokens per prompt (default 24)")
    demo.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="the embedded model's dtype (default float32)")
    demo.add_argument("--backend", default="engine", choices=["reference", "engine"],
                      help="engine (default) or the slow transformers reference decoder")
    demo.set_defaults(run=_demo)


def build_parser() -> argparse.ArgumentParser:
    """The `lmarith` parser with its subcommands: generate, serve, bench, demo."""
    parser = argparse.ArgumentParser(prog="lmarith", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [quiet_parent()]
    cli_generate.add_parser(commands, parents)
    cli_serve.add_parser(commands, parents)
    cli_bench.add_parser(commands, parents)
    _add_demo(commands, parents)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (2 for usage and lmarith errors)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    apply_quiet(args)
    from lmarith.errors import LmarithError

    try:
        return args.run(args)
    except (LmarithError, UsageError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmarith generate ... | head -1`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
