"""The repository whose Scylla draft ``generate.py`` loads when no ``draft_model`` is passed.

``hf-scylla stage`` writes the staged repository's id here; the packaged recipe has none.
"""

DRAFT_REPO_ID = "hf-adamas-scylla-vrgd/SmolLM2-135M-Instruct-scylla-D1"
