"""lm-eval task YAMLs shipped with the package (``TASKS_DIR``), registered by ``hf-adamas eval`` / ``hf-scylla eval``.

``gsm8k_local`` (GSM8K test, exact match on the final number), ``passkey_2k`` / ``passkey_4k`` /
``passkey_8k`` (group ``passkey``: retrieval of a number hidden in filler text, built by
`hf_adamas.evaluation.passkey_prompt`), ``passkey_varied_2k`` / ``_4k`` / ``_8k`` (group
``passkey_varied``: the harder test, a needle in varied text, `hf_adamas.bench.needle`) and ``tinyshakespeare_ppl`` (rolling-loglikelihood perplexity
of a fixed slice of ``tinyshakespeare.txt``). Their data comes from the shared data folder
(`hf_common.data`); the dataset builders are in `hf_common.tasks.local_tasks`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""Pass as lm-eval's ``--include_path`` (or ``TaskManager(include_path=...)``) to get the local tasks."""

__all__ = ["TASKS_DIR"]
