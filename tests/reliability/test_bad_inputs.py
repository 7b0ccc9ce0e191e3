"""A table of bad inputs and faults, each tried on one shared LLM: every case raises its
specific LmarithError (or gives the correct output), and afterwards the same LLM still returns
a fresh LLM's greedy tokens with every KV page free."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import lmarith as la
from builders import assert_all_pages_free, make_model, make_tokenizer
from lmarith.decoding import sampler
from lmarith.worker.model_runner import ModelRunner

PROBE = "Once upon a time there was"
GREEDY = la.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@dataclass
class World:
    """What a case may use: the shared LLM, a model, a second model with another vocabulary,
    a scratch directory, pytest's monkeypatch."""

    llm: la.LLM
    model: la.Model
    stranger: la.Model
    scratch: Path
    monkeypatch: Any

    def generate(self, formula=None, prompt: Any = PROBE, params: Any = GREEDY):
        return self.llm.generate(prompt if isinstance(prompt, list) or prompt is None else [prompt],
                                 self.model if formula is None else formula, params)


@dataclass
class Case:
    """One bad input: what to call, the error type and a phrase of its message; or, with
    error None, a check of the call's (correct) output."""

    name: str
    call: Callable[[World], Any]
    error: Optional[type] = None
    phrase: str = ""
    check: Optional[Callable[[World, Any], None]] = None


def _sp(**fields) -> Callable[[World], Any]:
    return lambda w: w.generate(params=la.SamplingParams(**fields))


def _json(text: str) -> Callable[[World], Any]:
    return lambda w: w.generate(la.Formula.from_json(text))


def _model_dir(w: World, name: str, files: dict[str, str | bytes]) -> str:
    directory = w.scratch / name
    directory.mkdir(exist_ok=True)
    for file, content in files.items():
        (directory / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(directory)


def _config_of(w: World) -> str:
    return (Path(w.model.path) / "config.json").read_text()


def _fail_in(w: World, target, attribute: str, when: Callable[..., bool]) -> None:
    real = getattr(target, attribute)

    def planted(*args, **kwargs):
        if when(*args):
            raise RuntimeError("planted fault")
        return real(*args, **kwargs)
    w.monkeypatch.setattr(target, attribute, planted)


def _sampling_fault(w: World):
    _fail_in(w, sampler, "sample", lambda *a: bool((a[5] == 4242).any()))
    return w.generate(params=la.SamplingParams(temperature=1.0, seed=4242, max_tokens=4))


def _forward_fault(w: World):
    _fail_in(w, ModelRunner, "execute", lambda runner, items, cache: len(items) == 1 and items[0].count > 3)
    return w.generate(prompt="a prompt long enough to fault")


def _stream_closed(w: World):
    stream = w.llm.stream(PROBE, w.model, la.SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    first = next(stream)
    stream.close()
    return first


def _stream_dropped(w: World):
    stream = w.llm.stream(PROBE, w.model, la.SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    first = next(stream)
    del stream
    return first


def _two_threads(w: World):
    import threading
    results: dict[int, Any] = {}

    def caller(index: int) -> None:
        try:
            results[index] = w.generate(prompt=PROBE if index == 0 else "", params=GREEDY)
        except la.LmarithError as error:
            results[index] = error
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _same_as_alone(w: World, results) -> None:
    assert isinstance(results[1], la.PromptError)
    assert results[0][0].token_ids == w.generate()[0].token_ids


def _top_k_off(w: World, outputs) -> None:
    off = w.generate(params=la.SamplingParams(temperature=1.0, top_k=0, seed=9, max_tokens=8))
    assert outputs[0].token_ids == off[0].token_ids


def _first_chunk(w: World, chunk) -> None:
    assert chunk.token_ids


M = la.Model
CASES = [
    # formulas
    Case("nan constant", lambda w: w.generate(w.model + la.Constant(float("nan"))), la.FormulaError, "finite"),
    Case("float32 overflow weight", lambda w: w.generate(1e39 * w.model), la.FormulaError, "3.4e38"),
    Case("inf weight", lambda w: w.generate(w.model * float("inf")), la.FormulaError, "finite"),
    Case("a - a", lambda w: w.generate(w.model - w.model), la.FormulaError, "no model term"),
    Case("0 * a", lambda w: w.generate(0 * w.model), la.FormulaError, "no model term"),
    Case("constant only", lambda w: w.generate(la.Constant(1.0)), la.FormulaError, "no model term"),
    Case("union of constants", lambda w: w.generate(la.Union(1, 2)), la.FormulaError, "no model term"),
    Case("negative norm", lambda w: w.generate(w.model - 2 * w.model.prompt("x")), la.FormulaError, "norm"),
    Case("product of formulas", lambda w: w.model * w.model, la.FormulaError, "products of two formulas"),
    Case("divide by zero", lambda w: w.model / 0, la.FormulaError, "divide"),
    Case("string weight", lambda w: w.model * "2", la.FormulaError, "must be a number"),
    Case("bool weight", lambda w: w.model * True, la.FormulaError, "must be a number"),
    Case("top_p 0 node", lambda w: la.TopPTopK(w.model, top_p=0), la.FormulaError, "top_p"),
    Case("negative top_k node", lambda w: la.TopPTopK(w.model, top_k=-1), la.FormulaError, "top_k"),
    Case("zero temperature node", lambda w: la.TopPTopK(w.model, temperature=0), la.FormulaError, "temperature"),
    Case("nan self-debias", lambda w: la.SelfDebias(w.model, w.model, float("nan")), la.FormulaError, "strength"),
    Case("missing classifier", lambda w: w.generate(w.model + la.Classifier(w.model, str(w.scratch / "nope"))),
         la.ModelLoadError, "does not exist; give the local directory of a Hugging Face sequence"),
    Case("unknown template field", lambda w: w.model.prompt("x", "{system} {foo} {input}"), la.FormulaError,
         "unknown field"),
    Case("stray brace", lambda w: w.model.prompt("x", "{system} {input"), la.FormulaError, "format string"),
    Case("template without input", lambda w: w.model.prompt("x", "{system} only"), la.FormulaError, "{input}"),
    Case("prompt without template", lambda w: w.model.prompt("x", template=None), la.FormulaError,
         "must be a string"),
    Case("system without template", lambda w: la.Term(w.model, "You are rude."), la.FormulaError,
         "needs a template"),
    Case("union of one", lambda w: la.Union(w.model), la.FormulaError, "at least two"),
    Case("system not text", lambda w: w.model.prompt(5), la.FormulaError, "system prompt must be a string"),
    Case("different vocabularies", lambda w: w.generate(w.model + w.stranger), la.FormulaError,
         "different vocabularies"),
    Case("formula as string", lambda w: w.generate("M() - 0.5*M()"), la.FormulaError, "expected a formula"),
    Case("formula None", lambda w: w.llm.generate([PROBE], None, GREEDY), la.FormulaError, "expected a formula"),
    Case("formula a number", lambda w: w.generate(0.5), la.FormulaError, "expected a formula"),
    Case("formula count mismatch", lambda w: w.llm.generate(["a", "b"], [w.model], GREEDY), la.FormulaError,
         "2 prompts but 1 formulas"),
    Case("too many terms", lambda w: la.LLM(kv_cache_bytes=1 << 20, max_num_batched_tokens=2).generate(
        [PROBE], w.model + w.model.prompt("a") + w.model.prompt("b"), GREEDY), la.ConfigError,
         "max_num_batched_tokens"),
    # formula JSON
    Case("json list", _json("[1, 2]"), la.FormulaError, "must be an object"),
    Case("json null", _json("null"), la.FormulaError, "must be an object"),
    Case("json unknown op", _json('{"op": "nope"}'), la.FormulaError, "unknown formula op"),
    Case("json number as text", _json('{"op": "constant", "value": "0.5"}'), la.FormulaError, "must be a number"),
    Case("json path number", _json('{"op": "model", "path": 7}'), la.FormulaError, "at $"),
    Case("json NaN", _json('{"op": "constant", "value": NaN}'), la.FormulaError, "finite"),
    Case("json deep", _json('{"op": "indicator", "formula": ' * 3000 + '{"op": "constant", "value": 1}'
                            + "}" * 3000), la.FormulaError, "deep"),
    Case("json broken", _json('{"op": "model", "path": '), la.FormulaError, "malformed formula JSON"),
    Case("json not text", lambda w: la.Formula.from_json(42), la.FormulaError, "must be a string"),
    # prompts
    Case("empty prompt", lambda w: w.generate(prompt=""), la.PromptError, "empty"),
    Case("bytes prompt", lambda w: w.generate(prompt=[b"hi"]), la.PromptError, "must be a str"),
    Case("int prompt", lambda w: w.generate(prompt=[123]), la.PromptError, "must be a str"),
    Case("None prompt in list", lambda w: w.generate(prompt=[None]), la.PromptError, "must be a str"),
    Case("prompts None", lambda w: w.generate(prompt=None), la.PromptError, "prompts must be"),
    Case("prompts dict", lambda w: w.llm.generate({"a": 1}, w.model, GREEDY), la.PromptError, "prompts must be"),
    Case("lone surrogate", lambda w: w.generate(prompt="abc\ud800"), la.PromptError, "Unicode"),
    Case("prompt over the window", lambda w: w.generate(prompt="cat " * 400), la.PromptError, "window"),
    Case("one bad prompt of a batch", lambda w: w.generate(prompt=["fine", ""]), la.PromptError, "empty"),
    Case("stream of a list", lambda w: w.llm.stream(["a", "b"], w.model), la.PromptError, "one prompt"),
    # sampling parameters
    Case("negative temperature", _sp(temperature=-1), la.SamplingParamsError, "temperature"),
    Case("text temperature", _sp(temperature="0.7"), la.SamplingParamsError, "temperature"),
    Case("nan temperature", _sp(temperature=float("nan")), la.SamplingParamsError, "temperature"),
    Case("inf temperature", _sp(temperature=float("inf")), la.SamplingParamsError, "temperature"),
    Case("top_p 0", _sp(top_p=0), la.SamplingParamsError, "top_p"),
    Case("top_p above 1", _sp(top_p=1.5), la.SamplingParamsError, "top_p"),
    Case("negative top_k", _sp(top_k=-1), la.SamplingParamsError, "top_k"),
    Case("fractional top_k", _sp(top_k=1.5), la.SamplingParamsError, "top_k"),
    Case("min_p above 1", _sp(min_p=2), la.SamplingParamsError, "min_p"),
    Case("zero max_tokens", _sp(max_tokens=0), la.SamplingParamsError, "max_tokens"),
    Case("bool max_tokens", _sp(max_tokens=True), la.SamplingParamsError, "max_tokens"),
    Case("huge max_tokens", _sp(max_tokens=2 ** 40), la.SamplingParamsError, "max_tokens"),
    Case("negative seed", _sp(seed=-1), la.SamplingParamsError, "seed"),
    Case("seed too large", _sp(seed=2 ** 63), la.SamplingParamsError, "seed"),
    Case("stop None", _sp(stop=None), la.SamplingParamsError, "stop"),
    Case("empty stop string", _sp(stop=[""]), la.SamplingParamsError, "stop"),
    Case("stop not text", _sp(stop=[1]), la.SamplingParamsError, "stop"),
    Case("negative stop token", _sp(stop_token_ids=[-1]), la.SamplingParamsError, "stop_token_ids"),
    Case("ignore_eos text", _sp(ignore_eos="yes"), la.SamplingParamsError, "ignore_eos"),
    Case("params not SamplingParams", lambda w: w.generate(params="greedy"), la.SamplingParamsError,
         "must be a SamplingParams"),
    Case("mutating params", lambda w: setattr(GREEDY, "stop", "abc"), la.SamplingParamsError, "replace"),
    Case("top_k beyond int32 is off", lambda w: w.generate(params=la.SamplingParams(
        temperature=1.0, top_k=2 ** 31, seed=9, max_tokens=8)), check=_top_k_off),
    Case("top_k beyond the vocabulary is off", lambda w: w.generate(params=la.SamplingParams(
        temperature=1.0, top_k=100_000, seed=9, max_tokens=8)), check=_top_k_off),
    # model specs and files
    Case("missing model", lambda w: w.generate(M(str(w.scratch / "absent"))), la.ModelLoadError, "does not exist"),
    Case("int8 dtype", lambda w: M(w.model.path, dtype="int8"), la.ModelLoadError, "float32, bfloat16"),
    Case("garbage dtype", lambda w: M(w.model.path, dtype="garbage"), la.ModelLoadError, "not supported"),
    Case("path not text", lambda w: M(123), la.ModelLoadError, "non-empty string"),
    Case("config not JSON", lambda w: w.generate(M(_model_dir(w, "badjson", {"config.json": "{oops"}))),
         la.ModelLoadError, "not valid JSON"),
    Case("no config.json", lambda w: w.generate(M(_model_dir(w, "empty", {"README": "x"}))), la.ModelLoadError,
         "no config.json"),
    Case("unknown architecture", lambda w: w.generate(M(_model_dir(w, "falcon", {"config.json": json.dumps(
        {"architectures": ["FalconForCausalLM"]})}))), la.UnsupportedModelError, "FalconForCausalLM"),
    Case("no weights", lambda w: w.generate(M(_model_dir(w, "noweights", {"config.json": _config_of(w)}))),
         la.ModelLoadError, "safetensors"),
    Case("corrupt weights", lambda w: w.generate(M(_model_dir(w, "corrupt", {
        "config.json": _config_of(w), "model.safetensors": b"\x00" * 64}))), la.ModelLoadError, "cannot load"),
    Case("not a GGUF", lambda w: w.generate(M(_model_dir(w, "gg", {"x.gguf": b"nope" * 8}) + "/x.gguf")),
         la.ModelLoadError, "cannot load"),
    Case("good and missing load atomically", lambda w: w.generate(w.model + M(str(w.scratch / "gone"))),
         la.ModelLoadError, "does not exist"),
    # engine settings and KV budgets
    Case("models= with a bad path", lambda w: la.LLM(kv_cache_bytes=1 << 20, models=[str(w.scratch / "nope")]),
         la.ModelLoadError, "does not exist"),
    Case("models= with a number", lambda w: la.LLM(kv_cache_bytes=1 << 20, models=[5]), la.ModelLoadError,
         "non-empty string"),
    Case("fractional KV budget", lambda w: la.LLM(kv_cache_bytes=1.5e6), la.ConfigError, "kv_cache_bytes"),
    Case("zero KV budget", lambda w: la.LLM(kv_cache_bytes=0), la.ConfigError, "kv_cache_bytes"),
    Case("negative KV budget", lambda w: la.LLM(kv_cache_bytes=-5), la.ConfigError, "kv_cache_bytes"),
    Case("KV budget below a page", lambda w: la.LLM(kv_cache_bytes=100).generate([PROBE], w.model, GREEDY),
         la.ConfigError, "smaller than one page"),
    Case("fraction above 0.9", lambda w: la.LLM(kv_cache_bytes=None, kv_cache_fraction=2.0), la.ConfigError,
         "kv_cache_fraction"),
    Case("zero max_num_seqs", lambda w: la.LLM(max_num_seqs=0), la.ConfigError, "max_num_seqs"),
    Case("zero page_tokens", lambda w: la.LLM(page_tokens=0), la.ConfigError, "page_tokens"),
    Case("unknown device", lambda w: la.LLM(device="tpu"), la.ConfigError, "device"),
    Case("request larger than the pool", lambda w: la.LLM(kv_cache_bytes=8 * 1024, page_tokens=4).generate(
        ["cat " * 30], w.model, la.SamplingParams(max_tokens=64)), la.CacheExhaustedError, "kv_cache_bytes"),
    # faults and abandonment
    Case("fault while sampling", _sampling_fault, RuntimeError, "planted fault"),
    Case("fault in a forward", _forward_fault, RuntimeError, "planted fault"),
    Case("stream closed early", _stream_closed, check=_first_chunk),
    Case("stream dropped unread", _stream_dropped, check=_first_chunk),
    Case("two threads, one bad", _two_threads, check=_same_as_alone),
]


@pytest.fixture(scope="module")
def world_parts(llama_dir, tmp_path_factory):
    """One LLM for the whole table, and the greedy tokens a fresh LLM gives for the probe."""
    model = la.Model(str(llama_dir))
    stranger_dir = tmp_path_factory.mktemp("stranger")
    stranger = la.Model(str(make_model(stranger_dir, "llama", tokenizer=make_tokenizer(
        vocab_size=280, extra_text="zebra quokka"))))
    expected = la.LLM(kv_cache_bytes=4 << 20).generate([PROBE], model, GREEDY)[0].token_ids
    return la.LLM(kv_cache_bytes=4 << 20), model, stranger, expected


def test_the_table_has_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world_parts, tmp_path, monkeypatch):
    llm, model, stranger, expected = world_parts
    world = World(llm, model, stranger, tmp_path, monkeypatch)
    if case.error is None:
        case.check(world, case.call(world))
    else:
        with pytest.raises(case.error, match=_pattern(case.phrase)) as raised:
            case.call(world)
        if case.error is not RuntimeError:
            assert isinstance(raised.value, la.LmarithError)
    monkeypatch.undo()
    assert llm.generate([PROBE], model, GREEDY)[0].token_ids == expected
    assert_all_pages_free(llm)


def _pattern(phrase: str) -> str:
    return re.escape(phrase)


def test_sampling_params_copies_are_checked():
    changed = dataclasses.replace(GREEDY, max_tokens=3)
    assert changed.max_tokens == 3 and GREEDY.max_tokens == 8
    with pytest.raises(la.SamplingParamsError, match="max_tokens"):
        dataclasses.replace(GREEDY, max_tokens=0)
