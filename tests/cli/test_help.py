"""`lmarith CMD --help` documents every flag, with a help string each and two examples."""
import argparse
import re

import pytest

from lmarith.entrypoints import cli

FLAGS = {
    "generate": ["--model", "--formula", "--temperature", "--top-p", "--top-k", "--min-p",
                 "--max-tokens", "--seed", "--stop", "--stop-token-id", "--ignore-eos",
                 "--logprobs", "--kv-cache-bytes", "--max-num-seqs", "--device", "--kv-cache-dtype", "--chat",
                 "--system", "--json", "--quiet", "PROMPT"],
    "serve": ["--host", "--port", "--model", "--preset", "--api-key", "--kv-cache-bytes",
              "--max-num-seqs", "--device", "--kv-cache-dtype", "--quiet"],
    "bench": ["latency", "speculative", "kernels", "--plot", "--quiet"],
    "demo": ["--max-tokens", "--temperature", "--seed", "--dtype", "--backend"],
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_subcommand_is_tested_here():
    assert set(_subparsers(cli.build_parser())) == set(FLAGS)


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_mentions_every_flag_and_two_examples(run_cli, command):
    status, out, _ = run_cli(command, "--help")
    assert status == 0
    for flag in FLAGS[command]:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", out), f"{command} --help lacks {flag}"
    examples = out.split("examples:")[1]
    assert len(re.findall(rf"^  lmarith {command}\b", examples, re.MULTILINE)) >= 2


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_every_flag_has_a_help_string(command):
    parser = _subparsers(cli.build_parser())[command]
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings or action.dest


def test_top_level_help_lists_the_commands(run_cli):
    status, out, _ = run_cli("--help")
    assert status == 0
    for command in FLAGS:
        assert f"    {command} " in out
