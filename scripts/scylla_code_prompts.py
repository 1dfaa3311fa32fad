"""A held-out Scylla prompt set of code questions, built from the Python standard library's own source.

Each prompt shows one short standard-library function and asks to explain it, to add type hints, to
write a test, or to rewrite it, so answers quote and transform the code: a kind of prompt no Scylla
training data holds (the self-distilled chats and GSM8K), and one no setting was tuned on. The functions
come from a fixed list and are read with `inspect.getsource`, so the set is the same on every machine
with the same Python version.

    python scripts/scylla_code_prompts.py --output hf_scylla/bench/prompts/code.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from pathlib import Path

FUNCTIONS = (
    "textwrap.indent",
    "textwrap.dedent",
    "shlex.quote",
    "fnmatch.translate",
    "textwrap.shorten",
    "heapq.nsmallest",
    "statistics.median",
    "statistics.mode",
    "colorsys.rgb_to_hsv",
    "colorsys.hls_to_rgb",
    "calendar.isleap",
    "calendar.leapdays",
    "calendar.monthrange",
    "statistics.mean",
    "string.capwords",
    "base64.b64encode",
    "html.escape",
    "glob.has_magic",
    "textwrap.wrap",
    "difflib.get_close_matches",
    "shlex.split",
    "colorsys.rgb_to_yiq",
)
TASKS = (
    "Explain what this Python function does, step by step.",
    "Add type hints and a docstring to this Python function.",
    "Write two unit tests for this Python function.",
    "Rewrite this Python function to make it easier to read, and say what you changed.",
)
MAX_SOURCE_LINES = 60


def code_prompts() -> list[dict]:
    """One prompt per function of `FUNCTIONS` (tasks in turn), skipping sources over `MAX_SOURCE_LINES`."""
    prompts = []
    for name in FUNCTIONS:
        module_name, function_name = name.rsplit(".", 1)
        source = inspect.getsource(getattr(importlib.import_module(module_name), function_name)).strip()
        if source.count("\n") >= MAX_SOURCE_LINES:
            continue
        task = TASKS[len(prompts) % len(TASKS)]
        turn = f"{task}\n\n```python\n{source}\n```"
        prompts.append({"question_id": 9100 + len(prompts), "category": "code", "turns": [turn]})
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="JSONL file to write (must not exist).")
    args = parser.parse_args(argv)
    if args.output.exists():
        print(f"{args.output} exists; remove it first to rebuild the set", file=sys.stderr)
        return 2
    prompts = code_prompts()
    args.output.write_text("".join(json.dumps(prompt) + "\n" for prompt in prompts))
    print(f"Wrote {len(prompts)} prompts to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
