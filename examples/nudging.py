"""Nudging on the embedded SmolLM2-135M-Instruct: the model prompted plainly (no chat
template) is the base; the same model through its chat template is the nudger, which writes
the words where the base's top-1 probability is below gamma. Prints each answer of the base
alone, the nudger alone and the nudged base, with the fraction of tokens the nudger wrote.

    python examples/nudging.py [--gamma 0.4] [--max-tokens 80]

Any two models work, from different families and tokenizers (text hand-offs then):
    base, nudger = la.Model("/models/Llama-3.1-8B"), la.Model("/models/gemma-2-2b-it")
    la.Nudging(base.prompt("", template="Question: {input}\\nAnswer:"), nudger.chat())
"""
from __future__ import annotations

import argparse

import lmarith as la
from lmarith.embedded import embedded_model

QUESTIONS = ["What is the capital of France?", "Give me three tips for staying healthy.",
             "Why is the sky blue?"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gamma", type=float, default=0.4)
    parser.add_argument("--max-tokens", type=int, default=80)
    args = parser.parse_args()
    model = embedded_model()
    base = model.prompt("", template="Question: {input}\nAnswer:")
    nudger = model.chat("You are a helpful assistant.")
    nudged = la.Nudging(base, nudger, gamma=args.gamma)
    with la.LLM(models=[model]) as llm:
        for question in QUESTIONS:
            print(f"## {question}")
            for name, formula, extra in [("base alone", base, {"ignore_eos": True}),
                                         ("nudger alone", nudger, {}), ("nudged base", nudged, {})]:
                out = llm.generate([question], formula, la.SamplingParams(
                    temperature=0, max_tokens=args.max_tokens, **extra))[0]
                share = (f" ({out.metrics.nudged_tokens}/{len(out.token_ids)} tokens nudged, "
                         f"{out.metrics.nudging_rounds} rounds)" if formula is nudged else "")
                print(f"- {name}{share}: {out.text.strip()!r}")
            print()


if __name__ == "__main__":
    main()
