"""Each named method of `la.methods` on the embedded SmolLM2-135M-Instruct, next to the
plain chat answer it changes (greedy, so every difference comes from the formula).

    python examples/methods.py [--max-tokens 40] [--skip-fudge]

One model plays every part here, told apart by its prompts (and, for FUDGE, a stand-in
classifier: SmolLM2's body with an untrained 2-way head, saved once to the lmarith cache;
it shows the mechanism and its cost, not a real attribute). With real checkpoints each part
is its own model: e.g. proxy_tuning(la.Model(big_base), la.Model(small_chat), la.Model(small_base)).
"""
from __future__ import annotations

import argparse
import time

import lmarith as la
from lmarith.embedded import cache_root, embedded_model, embedded_model_dir

QUESTION = "Write two sentences about the ocean."
PLAIN = "Question: {input}\nAnswer:"


def stand_in_classifier() -> str:
    """SmolLM2 with a randomly initialised 2-way classification head (seeded), saved once."""
    target = cache_root() / "SmolLM2-135M-random-classifier"
    if not (target / "config.json").is_file():
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        torch.manual_seed(0)
        source = embedded_model_dir()
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
        model.config.pad_token_id = model.config.eos_token_id
        model.save_pretrained(target)
        AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return str(target)


def methods(m: la.Model, with_fudge: bool) -> dict[str, la.Formula]:
    chat = m.chat("You are a helpful assistant.")
    base = m.prompt("", template=PLAIN)
    found = {
        "classifier_free_guidance (pirate, g=1.5)": la.methods.classifier_free_guidance(
            m.chat("You are a pirate. Talk like a pirate."), chat, guidance_scale=1.5),
        "dexperts (polite vs rude experts, alpha=2)": la.methods.dexperts(
            chat, m.chat("You are extremely polite and warm."), m.chat("You are rude and curt."), alpha=2.0),
        "proxy_tuning (plain base + pirate chat - chat)": la.methods.proxy_tuning(
            base, m.chat("You are a pirate."), chat, alpha=1.0),
        "emulated_fine_tuning (chat + 0.5 (poet - chat))": la.methods.emulated_fine_tuning(
            chat, m.chat("You are a poet."), chat, beta=0.5),
        "self_debiasing (against a rude prompt)": la.methods.self_debiasing(
            chat, [m.chat("You use rude, offensive language.")], strength=50.0),
        "contrastive_decoding (chat vs plain amateur)": la.methods.contrastive_decoding(chat, base, alpha=0.1),
        "nudging (plain base, chat nudger)": la.Nudging(base, chat),
    }
    if with_fudge:
        found["fudge (stand-in classifier, k=8)"] = la.methods.fudge(chat, stand_in_classifier(), k=8)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--skip-fudge", action="store_true")
    args = parser.parse_args()
    m = embedded_model()
    params = la.SamplingParams(temperature=0, max_tokens=args.max_tokens)
    with la.LLM(models=[m]) as llm:
        plain = llm.generate([QUESTION], m.chat("You are a helpful assistant."), params)[0].text
        print(f"## {QUESTION}\n- plain chat: {plain.strip()!r}")
        for name, formula in methods(m, not args.skip_fudge).items():
            start = time.perf_counter()
            out = llm.generate([QUESTION], formula, params)[0]
            note = "changed" if out.text != plain else "same as plain"
            if out.metrics.nudging_rounds:
                note += f", {out.metrics.nudged_tokens}/{len(out.token_ids)} tokens nudged"
            print(f"- {name} [{note}, {time.perf_counter() - start:.1f} s]: {out.text.strip()!r}")


if __name__ == "__main__":
    main()
