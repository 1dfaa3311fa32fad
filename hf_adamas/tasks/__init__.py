"""The lm-eval tasks that need Adamas code, registered by ``import hf_adamas`` for ``hf-adamas eval``.

``passkey_2k`` / ``passkey_4k`` / ``passkey_8k`` (group ``passkey_local``): retrieval of a number hidden
in filler text, built by `hf_adamas.bench.evaluation.passkey_prompt` (the ``hf-adamas passkey`` protocol); the
builders are in `hf_adamas.tasks.passkey_tasks`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""Pass as lm-eval's ``--include_path`` (or ``TaskManager(include_path=...)``) to get the passkey tasks."""

__all__ = ["TASKS_DIR"]
