"""hf_common is the ground floor: none of its modules imports a method package, and nothing forms a circle."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hf_common

ROOT = Path(__file__).resolve().parent.parent
METHOD_PACKAGES = ("hf_adamas", "hf_scylla", "hf_vrgd", "hf_demo")

BLOCKED_IMPORT = """
import importlib, importlib.abc, json, sys, traceback

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is a method package and must not be imported here")
        return None

sys.meta_path.insert(0, Blocked())
failures = {{}}
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except Exception:
        failures[module] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def hf_common_modules() -> list[str]:
    return sorted(
        info.name for info in pkgutil.walk_packages(hf_common.__path__, prefix="hf_common.") if info.name
    )


def test_the_walk_finds_every_module() -> None:
    modules = hf_common_modules()
    assert {
        "hf_common.harness",
        "hf_common.harness_lm",
        "hf_common.demo",
        "hf_common.tasks.local_tasks",
    } <= set(modules)


def test_hf_common_imports_no_method_package() -> None:
    """Every hf_common module imports with hf_adamas, hf_scylla, hf_vrgd and hf_demo made unimportable."""
    code = BLOCKED_IMPORT.format(blocked=set(METHOD_PACKAGES), modules=hf_common_modules())
    failures = json.loads(_run(code))
    assert failures == {}, "\n".join(f"{name}:\n{trace}" for name, trace in failures.items())


def test_the_blocker_does_block() -> None:
    """The check can fail: a module that needs a method package is reported."""
    code = BLOCKED_IMPORT.format(blocked={"hf_adamas"}, modules=["hf_adamas.config"])
    assert "method package" in json.loads(_run(code))["hf_adamas.config"]


@pytest.mark.parametrize("package", ["hf_adamas", "hf_scylla", "hf_vrgd"])
def test_a_method_package_imports_no_other_method_package(package: str) -> None:
    """Each method package (and its CLI) loads with the other two blocked: they meet only in hf_demo."""
    others = set(METHOD_PACKAGES) - {package}
    failures = json.loads(_run(BLOCKED_IMPORT.format(blocked=others, modules=[package, f"{package}.cli"])))
    assert failures == {}, failures
