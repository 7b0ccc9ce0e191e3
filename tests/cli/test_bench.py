"""`lmarith bench`: finds the checkout's benchmarks, runs one with its own flags, and the
latency plot function draws a PNG from a measured table."""
import pytest

import lmarith
from lmarith.entrypoints import cli_bench
from lmarith.entrypoints.plots import plot_latency

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_latency_writes_a_png(tmp_path):
    table = {1: {1: 0.030, 2: 0.031, 3: 0.033, 5: 0.036}, 16: {1: 0.045, 2: 0.062, 3: 0.080, 5: 0.121}}
    path = plot_latency(table, tmp_path / "plots" / "latency.png", baselines={1: 0.06, 16: 0.09})
    assert path == tmp_path / "plots" / "latency.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 10_000   # axes, lines and labels, not an empty canvas


def test_plot_latency_rejects_an_empty_table(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_latency({}, tmp_path / "latency.png")


def test_unknown_benchmark_exits_2(run_cli):
    status, out, err = run_cli("bench", "nope")
    assert status == 2 and out == ""
    assert "invalid choice: 'nope'" in err


def test_the_checkouts_benchmarks_are_found():
    assert (cli_bench.benchmarks_dir() / "bench_latency.py").is_file()


def test_outside_a_checkout_bench_says_so(tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(lmarith, "__file__", str(tmp_path / "site-packages" / "lmarith" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli("bench", "latency")
    assert status == 2 and err.startswith("error: ") and "checkout" in err


def test_arguments_pass_through_to_the_benchmark(run_cli):
    status, out, _ = run_cli("bench", "latency", "--help")
    assert status == 0
    for flag in ("--tokens", "--repeats", "--batches", "--terms", "--plot"):
        assert flag in out


def test_run_script_gives_the_script_its_argv_and_exit_status(tmp_path, capsys):
    script = tmp_path / "bench_fake.py"
    script.write_text("import sys\nprint(repr(sys.argv[1:]), __name__)\nsys.exit(3)\n")
    assert cli_bench.run_script(script, ["lmarith bench fake", "--plot", "out.png"]) == 3
    assert capsys.readouterr().out == "['--plot', 'out.png'] __main__\n"
