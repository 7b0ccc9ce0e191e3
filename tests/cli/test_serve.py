"""`lmarith serve` builds the LLM with every model loaded and hands it, the models and the
presets to run_server (replaced here by a recorder; tests/server tests the server itself).
Bad flags exit 2 before anything loads."""
import sys
import types

import pytest

import lmarith as la

SERVER = "lmarith.entrypoints.openai.server"


@pytest.fixture
def recorded(monkeypatch):
    """Replace the server module by one whose run_server records its call."""
    calls = []

    def run_server(llm, models, presets, host, port, api_key=None):
        calls.append(dict(models=models, presets=presets, host=host, port=port, api_key=api_key,
                          stats=llm.stats()))

    fake = types.ModuleType(SERVER)
    fake.run_server = run_server
    monkeypatch.setitem(sys.modules, SERVER, fake)
    return calls


def test_serve_loads_the_models_and_passes_the_presets(llama_dir, chat_dir, run_cli, recorded):
    status, out, err = run_cli(
        "serve", "--host", "0.0.0.0", "--port", "8123", "--model", f"a={llama_dir}",
        "--model", f"b={chat_dir}", "--preset", "mix=M() + 0.5*M('Be rude.', model='b')",
        "--api-key", "secret", "--kv-cache-bytes", "8M", "--max-num-seqs", "4")
    assert (status, out) == (0, ""), err
    [call] = recorded
    a, b = la.Model(str(llama_dir)), la.Model(str(chat_dir))
    assert call["models"] == {"a": a, "b": b}
    assert call["presets"] == {"mix": a + 0.5 * b.prompt("Be rude.")}
    assert (call["host"], call["port"], call["api_key"]) == ("0.0.0.0", 8123, "secret")
    assert set(call["stats"].kv_page_tokens) == {a.spec, b.spec}   # both loaded up front
    assert "secret" not in err


def test_serve_without_presets_serves_each_model_bare(llama_dir, run_cli, recorded, monkeypatch):
    monkeypatch.setenv("LMARITH_API_KEY", "from-env")
    status, _, err = run_cli("serve", "--model", f"a={llama_dir}", "--kv-cache-bytes", "8M")
    assert status == 0, err
    [call] = recorded
    assert call["presets"] == {"a": la.Model(str(llama_dir))}
    assert (call["host"], call["port"], call["api_key"]) == ("127.0.0.1", 8000, "from-env")


@pytest.mark.parametrize("flags, message", [
    (["--preset", "nameless"], "--preset"),
    (["--preset", "p=M() +"], "column"),
    (["--preset", "p=M(model='/nowhere/model')"], "/nowhere/model"),   # loaded before serving
])
def test_bad_presets_exit_2(llama_dir, run_cli, recorded, flags, message):
    status, _, err = run_cli("serve", "--model", f"a={llama_dir}", "--kv-cache-bytes", "8M", *flags)
    assert status == 2 and err.startswith("error: ") and message in err
    assert recorded == []


@pytest.mark.parametrize("flags", [["--port", "http"], ["--port", "70000"],
                                   ["--max-num-seqs", "0"], ["--kv-cache-bytes", "-1"], ["--bogus"]])
def test_bad_flags_exit_2(run_cli, recorded, flags):
    status, _, err = run_cli("serve", *flags)
    assert status == 2 and "error:" in err
    assert recorded == []


def test_a_model_a_preset_names_by_path_loads_before_serving(llama_dir, chat_dir, run_cli, recorded):
    status, _, err = run_cli("serve", "--model", f"a={llama_dir}", "--kv-cache-bytes", "8M",
                             "--preset", f"p=M() - 0.5*M('Be rude.', model='{chat_dir}')")
    assert status == 0, err
    [call] = recorded
    assert set(call["stats"].kv_page_tokens) == {la.Model(str(llama_dir)).spec,
                                                 la.Model(str(chat_dir)).spec}
