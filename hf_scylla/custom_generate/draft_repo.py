"""The repository whose Scylla draft ``generate.py`` loads when no ``draft_model`` is passed.

``hf-scylla stage`` writes the staged repository's id here; the packaged recipe has none.
"""

DRAFT_REPO_ID = None
