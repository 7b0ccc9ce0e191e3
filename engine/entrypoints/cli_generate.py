"""`lmarith generate`: decode prompts with a formula over named models and stream the text to
stdout (or print every output as one JSON document with --json)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from lmarith.entrypoints.cli_common import (UsageError, add_engine_flags, add_model_flag,
                                            engine_kwargs, positive_int)

EPILOG = """\
Several prompts are all queued at once (decoded in one batch) and printed one after another,
each under a header line "==> PROMPT <==". A summary line per prompt ([N tokens, finish
reason]) goes to stderr unless --quiet. With no PROMPT and a pipe on stdin, stdin is the prompt.

examples:
  lmarith generate --temperature 0 --max-tokens 32 "The capital of France is"
  lmarith generate --model base=./llama-dir --model chat=./chat.gguf:bfloat16 \\
      --formula "M('You are helpful.') - 0.6*M('You are rude.', model='chat')" \\
      --top-p 0.9 --seed 1 --json "Tell me about cats." "Tell me about dogs."
"""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `generate` and its flags on the subcommand set."""
    parser = commands.add_parser(
        "generate", parents=parents, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="generate text for prompts with a formula", description=__doc__)
    parser.add_argument("prompt", nargs="*", metavar="PROMPT", help="the prompts (one request each)")
    add_model_flag(parser)
    parser.add_argument("--formula", default="M()", metavar="TEXT",
                        help="the formula, e.g. \"M('You are helpful.') + 0.5*Union(M(), "
                             "M('Be brief.'))\"; M() is the default model's bare term (default)")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user message through the models' chat templates")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="with --chat: a system message before the user message")
    add_sampling_flags(parser)
    add_engine_flags(parser)
    parser.add_argument("--json", action="store_true",
                        help="print all outputs (text, token_ids, finish_reason, metrics) as one "
                             "JSON document when done instead of streaming text")
    parser.set_defaults(run=run)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The SamplingParams flags; their values are checked by SamplingParams itself."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=1.0, metavar="T",
                       help="0 is greedy (default 1.0)")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P",
                       help="nucleus mass kept (default 1.0: off)")
    group.add_argument("--top-k", type=int, default=0, metavar="K",
                       help="most likely tokens kept (default 0: off)")
    group.add_argument("--min-p", type=float, default=0.0, metavar="P",
                       help="drop tokens below this fraction of the top probability (default 0: off)")
    group.add_argument("--max-tokens", type=positive_int, default=64, metavar="N",
                       help="tokens to generate per prompt at most (default 64)")
    group.add_argument("--seed", type=int, default=None, metavar="N",
                       help="makes sampling reproducible (default: random)")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when this text is generated, which is cut off (repeatable)")
    group.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                       help="stop after this token id (repeatable)")
    group.add_argument("--ignore-eos", action="store_true",
                       help="keep generating past the end-of-sequence token")
    group.add_argument("--logprobs", type=int, default=None, metavar="N",
                       help="with --json: each token's log-probability and its N (0..20) "
                            "most likely alternatives")


def sampling_params(args: argparse.Namespace):
    """The SamplingParams the flags describe (raises SamplingParamsError on bad values)."""
    import lmarith as la

    extra = {} if args.logprobs is None else {"logprobs": args.logprobs}
    return la.SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        max_tokens=args.max_tokens, seed=args.seed, stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_id), ignore_eos=args.ignore_eos, **extra)


def read_prompts(args: argparse.Namespace) -> list:
    """The prompts, as text or (with --chat) as one-turn conversations."""
    prompts = list(args.prompt)
    if not prompts and not sys.stdin.isatty():
        prompts = [sys.stdin.read()]
    if not prompts:
        raise UsageError("give at least one PROMPT (or pipe one on stdin)")
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    if not args.chat:
        return prompts
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    return [system + [{"role": "user", "content": prompt}] for prompt in prompts]


def run(args: argparse.Namespace) -> int:
    """Parse the models and formula, decode every prompt, print the text or the JSON."""
    import lmarith as la
    from lmarith.entrypoints.arguments import parse_model_flags

    if args.logprobs is not None and not args.json:
        raise UsageError("--logprobs needs --json (log-probabilities are not streamed as text)")
    prompts = read_prompts(args)
    params = sampling_params(args)
    models = parse_model_flags(args.model)
    formula = la.parse_formula(args.formula, models)
    used = list(dict.fromkeys(term.spec for term in formula.terms))
    with la.LLM(models=used, **engine_kwargs(args)) as llm:
        if args.json:
            outputs = llm.generate(prompts, formula, params)
            json.dump(json_document(formula, prompts, outputs), sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            stream_all(llm, prompts, formula, params, summary=not args.quiet)
    return 0


def stream_all(llm, prompts: list, formula, params, summary: bool = True) -> None:
    """Queue every prompt at once, then write each one's text as it comes, in order."""
    streams = [llm.stream(prompt, formula, params) for prompt in prompts]
    for prompt, chunks in zip(prompts, streams):
        if len(prompts) > 1:
            sys.stdout.write(f"==> {prompt_label(prompt)} <==\n")
        tokens, finish, metrics = 0, None, None
        for chunk in chunks:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            tokens += len(chunk.token_ids)
            finish, metrics = chunk.finish_reason or finish, chunk.metrics or metrics
        sys.stdout.write("\n")
        sys.stdout.flush()
        if summary:
            nudged = (f", {metrics.nudged_tokens} nudged in {metrics.nudging_rounds} rounds"
                      if metrics is not None and metrics.nudging_rounds else "")
            print(f"[{tokens} tokens, {finish}{nudged}]", file=sys.stderr, flush=True)


def prompt_label(prompt: Any) -> str:
    """A prompt as a header shows it: the text, or a conversation's last message."""
    text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    return " ".join(text.split())


def json_document(formula, prompts: list, outputs: list) -> dict[str, Any]:
    """{"formula": ..., "outputs": [one dict per prompt]}, with non-finite numbers as null."""
    items = []
    for prompt, output in zip(prompts, outputs):
        item = {"prompt": prompt, "text": output.text, "token_ids": list(output.token_ids),
                "finish_reason": output.finish_reason, "num_preemptions": output.num_preemptions,
                "metrics": dataclasses.asdict(output.metrics)}
        logprobs = getattr(output, "logprobs", None)
        if logprobs is not None:
            item["logprobs"] = [dataclasses.asdict(entry) for entry in logprobs]
        items.append(item)
    return finite({"formula": str(formula), "outputs": items})


def finite(value: Any) -> Any:
    """value with every NaN/infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value
