"""Formula strings: the issue's examples, str(formula) parsing back to an equal formula for
random formulas, named models, and FormulaErrors that point at the column."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

import lmarith as la
from lmarith import FormulaError, parse_formula

BIG, SMALL = la.Model("/models/big"), la.Model("/models/small", dtype="bfloat16")
MODELS = {"big": BIG, "small": SMALL}


def test_the_issue_example():
    text = "M('You are helpful.') - 0.6*M('You are rude.', model='small') + 2*Union(M('a'), M('b'))"
    expected = (BIG.prompt("You are helpful.") - 0.6 * SMALL.prompt("You are rude.")
                + 2 * la.Union(BIG.prompt("a"), BIG.prompt("b")))
    assert parse_formula(text, MODELS) == expected


@pytest.mark.parametrize("text, expected", [
    ("M()", BIG),
    ("M(model='small')", SMALL),
    ("M(model='/elsewhere/m.gguf')", la.Model("/elsewhere/m.gguf")),
    ("Chat('Be brief.', model='small')", SMALL.chat("Be brief.")),
    ("Chat()", BIG.chat()),
    ("M('s', template='{input} / {system}')", BIG.prompt("s", template="{input} / {system}")),
    ("M('s', speculative_factor=4) + M()", BIG.prompt("s", speculative_factor=4) + BIG),
    ("(M() + M('x')) / 2", (BIG + BIG.prompt("x")) / 2),
    ("-M() + 2*M('x') - -1*M('y')", -BIG + 2 * BIG.prompt("x") + BIG.prompt("y")),
    ("Intersection(M(), M('x'), M('y'))", la.Intersection(BIG, BIG.prompt("x"), BIG.prompt("y"))),
    ("TopPTopK(M(), top_k=5, top_p=0.9)", la.TopPTopK(BIG, top_k=5, top_p=0.9)),
    ("SelfDebias(M(), M('rude'), strength=10)", la.SelfDebias(BIG, BIG.prompt("rude"), strength=10)),
    ("Speculative(M(), NgramDraft(n=2), k=3)", la.Speculative(BIG, la.NgramDraft(n=2), k=3)),
    ("Speculative(M(), M(model='small'), k=2)", la.Speculative(BIG, SMALL, k=2)),
    ("M(dtype='bfloat16')", la.Model("/models/big", dtype="bfloat16")),
])
def test_formula_strings(text, expected):
    assert parse_formula(text, MODELS) == expected


def _terms():
    systems = st.sampled_from(["You are helpful.", "It's \"quoted\".\n", "ünïcode ☃"])
    models = st.sampled_from([BIG, SMALL])
    factors = st.sampled_from([1, 1, 2, "auto"])
    return st.one_of(
        st.builds(lambda m: m, models),
        st.builds(lambda m, s, k: m.prompt(s, speculative_factor=k), models, systems, factors),
        st.builds(lambda m, s: m.chat(s), models, st.one_of(st.none(), systems)),
        st.builds(lambda m, s: m.prompt(s, template="[{system}] {input}"), models, systems))


def _formulas():
    weights = st.floats(-3, 3, allow_nan=False).filter(lambda w: abs(w) > 1e-3)
    return st.recursive(_terms(), lambda inner: st.one_of(
        st.builds(lambda a, b, w: a + w * b, inner, inner, weights),
        st.builds(lambda a, w: w * a, inner, weights),
        st.builds(la.Union, inner, inner), st.builds(la.Intersection, inner, inner),
        st.builds(lambda a, k: la.TopPTopK(a, top_k=k, top_p=0.9), inner, st.integers(0, 50)),
        st.builds(la.Indicator, inner),
        st.builds(lambda a, c: a + c, inner, st.floats(-2, 2, allow_nan=False))), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(_formulas())
def test_str_parses_back_to_an_equal_formula(formula):
    assert parse_formula(str(formula)) == formula
    assert parse_formula(str(formula), MODELS) == formula     # paths win over names


@pytest.mark.parametrize("text, column, words", [
    ("M() +", 1, "syntax"),
    ("M() + foo", 7, "name"),
    ("M() + Bad(1)", 7, "unknown name 'Bad'"),
    ("M() * M('x')", 1, "must be a number"),
    ("M('a', foo=1)", 1, "unexpected keyword argument 'foo'"),
    ("Union(M())", 1, "at least two"),
    ("M() + M().path", 7, "attribute"),
    ("M(model=3)", 1, "quoted name or path"),
    ("'a' + M()", 1, "strings go inside"),
    ("__import__('os').system('true')", 1, "only plain names"),
    ("M() + [1]", 7, "list"),
    ("M(speculative_factor=0)", 1, "speculative_factor"),
    ("2 + 3", None, "not a formula"),
])
def test_errors_point_at_the_column(text, column, words):
    with pytest.raises(FormulaError) as caught:
        parse_formula(text, MODELS)
    message = str(caught.value)
    assert words in message
    if column is not None:
        assert f"at column {column}" in message


def test_no_default_model_without_models():
    with pytest.raises(FormulaError, match="no default model"):
        parse_formula("M('x')")


def test_not_a_string_and_too_long():
    with pytest.raises(FormulaError, match="must be a str"):
        parse_formula(3)
    with pytest.raises(FormulaError, match="limit"):
        parse_formula("M() + " * 30000 + "M()", MODELS)


def test_deep_nesting_is_a_formula_error():
    with pytest.raises(FormulaError):
        parse_formula("(" * 5000 + "M()" + ")" * 5000, MODELS)
