"""`lmarith generate`: the text it streams and the JSON it prints are what llm.generate gives
in-process for the same formula and sampling; every user error is one `error:` line, exit 2."""
import io
import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest

import lmarith as la
from lmarith.entrypoints import cli_generate

FORMULA_TEXT = "M() + 0.5*M('You are rude.')"
SMALL_KV = ["--kv-cache-bytes", "8M"]   # the default KV budget is 1 GiB


def _generate(model_dir, prompts, params):
    model = la.Model(str(model_dir))
    formula = model + 0.5 * model.prompt("You are rude.")
    assert la.parse_formula(FORMULA_TEXT, {"tiny": model}) == formula
    with la.LLM(kv_cache_bytes=8 << 20, models=[model]) as llm:
        return llm.generate(prompts, formula, params)


def test_python_m_lmarith_streams_the_formulas_greedy_text(llama_dir):
    """The one subprocess: `python -m lmarith generate ...` exactly as a user types it."""
    command = [sys.executable, "-m", "lmarith", "generate", "--model", f"tiny={llama_dir}",
               "--formula", FORMULA_TEXT, "--temperature", "0", "--max-tokens", "8", *SMALL_KV,
               "The cat"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LMARITH_NO_PROGRESS": "1"}
    done = subprocess.run(command, capture_output=True, env=env, timeout=300)
    [expected] = _generate(llama_dir, ["The cat"], la.SamplingParams(temperature=0, max_tokens=8))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode("utf-8") == expected.text + "\n"
    assert f"[{len(expected.token_ids)} tokens, {expected.finish_reason}]" in done.stderr.decode()


def test_several_prompts_stream_in_order_under_headers(llama_dir, run_cli):
    prompts = ["The cat", "Tell me about dogs"]
    status, out, err = run_cli("generate", "--model", f"tiny={llama_dir}", "--formula", FORMULA_TEXT,
                               "--temperature", "0.9", "--seed", "4", "--max-tokens", "6", *SMALL_KV,
                               *prompts)
    outputs = _generate(llama_dir, prompts, la.SamplingParams(temperature=0.9, seed=4, max_tokens=6))
    assert status == 0, err
    assert out == "".join(f"==> {p} <==\n{o.text}\n" for p, o in zip(prompts, outputs))
    assert err.count("tokens, ") == 2


def test_json_output_matches_generate(llama_dir, run_cli):
    prompts = ["The cat", "Paris is"]
    status, out, err = run_cli("generate", "--model", f"tiny={llama_dir}", "--formula", FORMULA_TEXT,
                               "--temperature", "0.7", "--top-k", "20", "--seed", "9",
                               "--max-tokens", "5", "--json", *SMALL_KV, *prompts)
    params = la.SamplingParams(temperature=0.7, top_k=20, seed=9, max_tokens=5)
    outputs = _generate(llama_dir, prompts, params)
    assert status == 0, err
    document = json.loads(out)
    assert la.parse_formula(document["formula"], {"tiny": la.Model(str(llama_dir))}) == \
        la.parse_formula(FORMULA_TEXT, {"tiny": la.Model(str(llama_dir))})
    assert [item["prompt"] for item in document["outputs"]] == prompts
    for item, output in zip(document["outputs"], outputs):
        assert (item["text"], item["token_ids"], item["finish_reason"]) == \
            (output.text, output.token_ids, output.finish_reason)
        assert set(item["metrics"]) == {f.name for f in fields(la.RequestMetrics)}
        assert item["metrics"]["prompt_tokens"] == output.metrics.prompt_tokens
        assert "logprobs" not in item


def test_json_logprobs_match_generate(llama_dir, run_cli):
    status, out, err = run_cli("generate", "--model", f"tiny={llama_dir}", "--temperature", "0",
                               "--max-tokens", "3", "--logprobs", "2", "--json", *SMALL_KV, "The cat")
    assert status == 0, err
    [item] = json.loads(out)["outputs"]
    with la.LLM(kv_cache_bytes=8 << 20) as llm:
        [output] = llm.generate(["The cat"], la.Model(str(llama_dir)),
                                la.SamplingParams(temperature=0, max_tokens=3, logprobs=2))
    assert [entry["token_id"] for entry in item["logprobs"]] == output.token_ids
    for entry, expected in zip(item["logprobs"], output.logprobs):
        assert entry["logprob"] == pytest.approx(expected.logprob)
        assert [top[0] for top in entry["top"]] == [top[0] for top in expected.top]


def test_chat_sends_a_conversation(chat_dir, run_cli):
    status, out, err = run_cli("generate", "--model", f"c={chat_dir}", "--chat", "--system", "Be brief.",
                               "--temperature", "0", "--max-tokens", "5", *SMALL_KV, "Hi")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with la.LLM(kv_cache_bytes=8 << 20) as llm:
        [output] = llm.generate([messages], la.Model(str(chat_dir)),
                                la.SamplingParams(temperature=0, max_tokens=5))
    assert status == 0, err
    assert out == output.text + "\n"


def test_prompt_from_stdin(llama_dir, run_cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The cat"))
    status, out, err = run_cli("generate", "--model", f"tiny={llama_dir}", "--temperature", "0",
                               "--max-tokens", "4", "--quiet", *SMALL_KV)
    with la.LLM(kv_cache_bytes=8 << 20) as llm:
        [output] = llm.generate(["The cat"], la.Model(str(llama_dir)),
                                la.SamplingParams(temperature=0, max_tokens=4))
    assert (status, out, err) == (0, output.text + "\n", "")


def test_every_sampling_flag_reaches_sampling_params():
    parser = cli_generate_parser()
    args = parser.parse_args(["generate", "--temperature", "0.5", "--top-p", "0.8", "--top-k", "7",
                              "--min-p", "0.1", "--max-tokens", "9", "--seed", "3", "--stop", "x",
                              "--stop", "\n\n", "--stop-token-id", "5", "--ignore-eos",
                              "--logprobs", "1", "p"])
    assert cli_generate.sampling_params(args) == la.SamplingParams(
        temperature=0.5, top_p=0.8, top_k=7, min_p=0.1, max_tokens=9, seed=3, stop=("x", "\n\n"),
        stop_token_ids=(5,), ignore_eos=True, logprobs=1)


def cli_generate_parser():
    from lmarith.entrypoints.cli import build_parser
    return build_parser()


@pytest.mark.parametrize("flags, message", [
    (["--formula", "M() + 0.5*M('You are rude.'"], "column"),       # a formula syntax error
    (["--formula", "M() + Nope(M())"], "Nope"),                     # an unknown node
    (["--top-p", "1.5"], "top_p"),                                  # SamplingParamsError
    (["--chat"], "chat template"),                                  # PromptError: no template
    (["--logprobs", "2"], "--json"),
    (["--system", "Be brief."], "--chat"),
])
def test_user_errors_are_one_line_and_exit_2(llama_dir, run_cli, flags, message):
    status, out, err = run_cli("generate", "--model", f"tiny={llama_dir}", *flags, *SMALL_KV, "The cat")
    assert status == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_missing_model_path_exits_2(tmp_path, run_cli):
    status, _, err = run_cli("generate", "--model", f"x={tmp_path / 'absent'}", "The cat")
    assert status == 2 and err.startswith("error: ") and "does not exist" in err


@pytest.mark.parametrize("flags", [["--max-tokens", "0"], ["--kv-cache-bytes", "lots"],
                                   ["--temperature", "hot"], ["--device", "tpu"]])
def test_bad_flag_values_exit_2_before_anything_loads(run_cli, flags):
    status, out, err = run_cli("generate", *flags, "The cat")
    assert status == 2 and out == "" and "error:" in err


def test_no_prompt_on_a_terminal_exits_2(run_cli, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    monkeypatch.setattr(sys, "stdin", Terminal())
    status, _, err = run_cli("generate")
    assert status == 2 and "PROMPT" in err


def test_json_has_no_infinities():
    document = cli_generate.finite({"a": float("-inf"), "b": [1.5, float("nan")], "c": (2, "x")})
    assert document == {"a": None, "b": [1.5, None], "c": [2, "x"]}
    json.dumps(document, allow_nan=False)


def test_tensor_parallel_size_flag_gives_the_same_text(llama_dir, run_cli):
    """--tensor-parallel-size 2: two gloo ranks, the same seeded formula text as in-process."""
    status, out, err = run_cli("generate", "--model", f"tiny={llama_dir}", "--formula", FORMULA_TEXT,
                               "--temperature", "0.9", "--seed", "4", "--max-tokens", "6", *SMALL_KV,
                               "--tensor-parallel-size", "2", "The cat")
    [expected] = _generate(llama_dir, ["The cat"], la.SamplingParams(temperature=0.9, seed=4, max_tokens=6))
    assert status == 0, err
    assert out == expected.text + "\n"
