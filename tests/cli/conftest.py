"""Fixtures of the command-line tests: a tiny model with a chat template (tests/conftest.py's
llama_dir has none), and `run_cli`, which runs `lmarith ARGS...` in this process."""
import pytest
from builders import make_model, make_tokenizer

from lmarith.entrypoints import cli

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return make_model(tmp_path_factory.mktemp("chat"), "llama", seed=3, tokenizer=tokenizer)


@pytest.fixture(autouse=True)
def no_progress(monkeypatch):
    monkeypatch.setenv("LMARITH_NO_PROGRESS", "1")


@pytest.fixture
def run_cli(capsys):
    """run_cli(*args) -> (exit status, stdout, stderr) of `lmarith args...` in-process."""
    def run(*args: str):
        try:
            status = cli.main(list(args))
        except SystemExit as exit_:
            status = exit_.code
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return run
