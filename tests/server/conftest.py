"""Fixtures of the server tests: tiny model directories (two with a chat template, one
without), the models and presets of launch_openai_server.build, an in-process LLM on the same
directories (it computes what the server must answer, and hosts in-process apps), and one
real server process (shared by the modules) on a free port of 127.0.0.1."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from builders import make_model, make_tokenizer

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "launch_openai_server.py"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
START_TIMEOUT = 120


def _load_launcher():
    spec = importlib.util.spec_from_file_location("launch_openai_server", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launcher = _load_launcher()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """tiny and tiny-b share a tokenizer with a chat template; plain has none. A 1024-token
    window, so one request can outgrow the 128-page pool."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    root = tmp_path_factory.mktemp("server_models")
    a = make_model(root / "a", "llama", seed=1, tokenizer=tokenizer, max_position_embeddings=1024)
    b = make_model(root / "b", "llama", seed=2, tokenizer=tokenizer, max_position_embeddings=1024)
    plain = make_model(root / "plain", "llama", seed=3, max_position_embeddings=1024)
    return a, b, plain


@pytest.fixture(scope="session")
def setup(model_dirs):
    """(models, presets) exactly as the server process builds them."""
    return launcher.build(*model_dirs)


@pytest.fixture(scope="session")
def local_llm(setup):
    import lmarith as la

    models, _ = setup
    llm = la.LLM(**launcher.LLM_SETTINGS, models=list(models.values()))
    yield llm
    llm.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n"
                               f"{log.read_text(errors='replace')[-5000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not become healthy in {START_TIMEOUT} s")


@pytest.fixture(scope="session")
def server_url(model_dirs, tmp_path_factory):
    """The one real server process of the test run (uvicorn on 127.0.0.1), shared by the
    server test modules: yields its base URL. Its output goes to a log file (shown if it
    fails to start)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server_log") / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, str(LAUNCHER), str(port), *map(str, model_dirs)],
                                   stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_WAIT_POLICY": "passive"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def client(server_url):
    """The official openai client on the server (no retries, so each error is seen once)."""
    import openai

    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(server_url):
    with httpx.Client(base_url=server_url, timeout=60) as http:
        yield http
