"""`lmarith bench NAME [ARGS...]`: run one of the repository's benchmark scripts
(benchmarks/bench_NAME.py), passing ARGS through. The scripts live in a checkout, not in the
installed package, so this works from an editable install or from inside a checkout."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any, Optional

from lmarith.entrypoints.cli_common import UsageError

BENCHMARKS = {
    "latency": ("bench_latency.py", "decode ms/step of 1..5-term formulas against one model "
                                    "and transformers"),
    "speculative": ("bench_speculative.py", "the three kinds of exact speculative sampling"),
    "kernels": ("bench_kernels.py", "the fused combine + sample kernels against torch eager"),
    "serve": ("bench_serve.py", "the HTTP server under concurrent clients"),
}
EPILOG = "benchmarks:\n" + "".join(
    f"  {name:<12} {text}\n" for name, (_, text) in BENCHMARKS.items()) + """
Every flag after NAME goes to the benchmark (`lmarith bench NAME --help` lists them). The
latency benchmark takes --tokens, --repeats, --batches, --terms and --plot PATH.

examples:
  lmarith bench latency --tokens 32 --repeats 3 --plot latency.png
  lmarith bench speculative --sections A C
"""


def add_parser(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `bench`: a benchmark name and the arguments passed through to it."""
    parser = commands.add_parser(
        "bench", parents=parents, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run a benchmark from the checkout's benchmarks/ directory", description=__doc__)
    parser.add_argument("benchmark", choices=list(BENCHMARKS), metavar="NAME",
                        help="which benchmark: " + ", ".join(BENCHMARKS))
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="passed to the benchmark as its own flags (e.g. --plot out.png)")
    parser.set_defaults(run=run)


def benchmarks_dir(start: Optional[Path] = None) -> Path:
    """The checkout's benchmarks/: beside the package's source directory, else under the
    current directory. UsageError when neither has one (a wheel install)."""
    import lmarith

    package_parent = Path(lmarith.__file__).resolve().parent.parent
    candidates = [package_parent / "benchmarks", (start or Path.cwd()) / "benchmarks"]
    for candidate in candidates:
        if (candidate / "bench_latency.py").is_file():
            return candidate
    raise UsageError("the benchmarks are scripts in the lmarith repository, not in the installed "
                     "package: run `lmarith bench` from a checkout (or an editable install of one)")


def run(args: argparse.Namespace) -> int:
    """Run benchmarks/bench_NAME.py in this process as __main__ with ARGS as its argv."""
    script = benchmarks_dir() / BENCHMARKS[args.benchmark][0]
    if not script.is_file():
        raise UsageError(f"{script} is not in this checkout")
    return run_script(script, [f"lmarith bench {args.benchmark}", *args.args])


def run_script(script: Path, argv: list[str]) -> int:
    """runpy the script with sys.argv = argv (and its folder importable); its exit status."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = argv
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0
