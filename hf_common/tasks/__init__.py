"""lm-eval task YAMLs that need no method code (``TASKS_DIR``), on the include path of every ``eval`` command.

``gsm8k_local`` (GSM8K test, exact match on the final number) and ``tinyshakespeare_ppl``
(rolling-loglikelihood perplexity of a fixed slice of ``tinyshakespeare.txt``). Their data comes from the
shared data folder (`hf_common.data`); the dataset builders are in `hf_common.tasks.local_tasks`. A method
package adds its own task folder with `hf_common.harness.register_lm_eval_tasks` (the passkey tasks live
in `hf_adamas.tasks`).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""Pass as lm-eval's ``--include_path`` (or ``TaskManager(include_path=...)``) to get the local tasks."""

__all__ = ["TASKS_DIR"]
