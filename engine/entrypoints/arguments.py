"""Command-line values shared by `lmarith generate` and `lmarith serve`: named models
(`--model NAME=PATH[:dtype]`, the first is the default) and named formulas
(`--preset NAME=FORMULA`, formula strings read by lmarith.parse_formula)."""
from __future__ import annotations

from ..config import ModelSpec
from ..errors import ConfigError
from ..formula import Formula, Model, parse_formula

DTYPES = ("float32", "bfloat16", "float16")


def _split(value: str, flag: str, example: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ConfigError(f"{flag} {value!r} must look like {example}")
    return name.strip(), rest.strip()


def parse_model_flags(values: list[str]) -> dict[str, Model]:
    """{name: Model} in flag order; no flags: the embedded SmolLM2 as "smollm2"."""
    if not values:
        from ..embedded import embedded_model
        return {"smollm2": embedded_model()}
    models: dict[str, Model] = {}
    for value in values:
        name, path = _split(value, "--model", "NAME=PATH or NAME=PATH:bfloat16")
        base, _, dtype = path.rpartition(":")
        if dtype in DTYPES and base:
            path = base
        else:
            dtype = "float32"
        if name in models:
            raise ConfigError(f"--model {name} is given twice; give each model one name")
        models[name] = Model(ModelSpec(path, dtype).path, dtype)
    return models


def parse_preset_flags(values: list[str], models: dict[str, Model]) -> dict[str, Formula]:
    """{name: formula}; no flags: one preset per model, its bare term, named like the model."""
    if not values:
        return dict(models)
    presets: dict[str, Formula] = {}
    for value in values:
        name, text = _split(value, "--preset", "NAME=\"M('You are helpful.') + 0.5*M()\"")
        if name in presets:
            raise ConfigError(f"--preset {name} is given twice; give each preset one name")
        presets[name] = parse_formula(text, models)
    return presets


def models_to_load(models: dict, presets: dict) -> list:
    """Every --model, and any other model a preset names by path, each once: all of them
    load before the server starts, so a bad path fails now rather than on a request."""
    specs = [model.spec for model in models.values()]
    specs += [term.spec for preset in presets.values() for term in preset.terms]
    return list(dict.fromkeys(specs))
