"""Progress bars draw on a terminal only, never when switched off, and model loading draws
one only for big models."""
import io

import pytest

from lmarith.models.loading import loader, progress as progress_module
from lmarith.models.loading.progress import progress, progress_enabled


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_draw_on_a_terminal_unless_switched_off(monkeypatch):
    monkeypatch.delenv("LMARITH_NO_PROGRESS", raising=False)
    assert progress_enabled(Terminal())
    assert not progress_enabled(io.StringIO())          # a pipe or a file: no bar
    monkeypatch.setenv("LMARITH_NO_PROGRESS", "0")
    assert progress_enabled(Terminal())
    monkeypatch.setenv("LMARITH_NO_PROGRESS", "1")
    assert not progress_enabled(Terminal())


@pytest.mark.parametrize("total, min_total, drawn", [(5, 0, True), (5, 10, False)])
def test_progress_draws_only_enough_work(monkeypatch, total, min_total, drawn):
    monkeypatch.delenv("LMARITH_NO_PROGRESS", raising=False)
    terminal = Terminal()
    for _ in progress(range(total), total=total, desc="work", min_total=min_total, file=terminal):
        pass
    assert ("work" in terminal.getvalue()) == drawn


def test_loading_draws_a_bar_for_big_models_only(llama_dir, monkeypatch):
    monkeypatch.delenv("LMARITH_NO_PROGRESS", raising=False)
    terminal = Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    loader.load_model(str(llama_dir))                  # ~20 tensors: below the threshold
    assert terminal.getvalue() == ""
    monkeypatch.setattr(loader, "LOADING_BAR_MIN_TENSORS", 1)
    monkeypatch.setattr(loader, "LOADING_BAR_DELAY", 0.0)
    loader.load_model(str(llama_dir))
    assert f"loading {llama_dir.name}" in terminal.getvalue()
    assert "tensor" in terminal.getvalue()
