"""Command line: `python -m lmarith demo` runs a 3-term formula on the embedded model."""
from __future__ import annotations

import argparse
import os
import sys
import time


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


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="lmarith", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="generate with a 3-term formula on the embedded SmolLM2")
    demo.add_argument("prompt", nargs="*", default=["The capital of France is"])
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("--temperature", type=float, default=0.0)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    demo.add_argument("--backend", default="engine", choices=["reference", "engine"])
    args = parser.parse_args(argv)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
