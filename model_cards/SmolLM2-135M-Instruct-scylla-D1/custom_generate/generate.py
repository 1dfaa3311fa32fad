"""Scylla speculative decoding (arXiv 2505.07858) as a transformers ``custom_generate`` recipe.

Locally: ``target.generate(input_ids, custom_generate=hf_scylla.CUSTOM_GENERATE_DIR, trust_remote_code=True,
draft_model=draft, ...)``. ``hf-scylla stage`` copies this file unchanged into a staged repository and
names that repository in ``draft_repo.py`` next to it, so ``target.generate(input_ids,
custom_generate="<org>/<repo>", trust_remote_code=True, ...)`` loads the Scylla draft stored there (from
the same ``revision`` you pass to ``generate``, if any). Either way transformers' assisted decoding runs
with the draft through ``hf_scylla.generation.scylla_generate``; output equals the target's own
decoding, only speed changes.
"""

import weakref

from hf_scylla import ScyllaDraftModel
from hf_scylla.generation import scylla_generate

from .draft_repo import DRAFT_REPO_ID

_loaded_drafts = weakref.WeakKeyDictionary()


def _draft_for(model, draft_repo, revision, token):
    """The draft attached to ``model``, loaded once per (target instance, repo, revision)."""
    drafts = _loaded_drafts.setdefault(model, {})
    key = (str(draft_repo), revision)
    if key not in drafts:
        draft = ScyllaDraftModel.from_pretrained(
            draft_repo, revision=revision, token=token, target=model, dtype=model.dtype
        )
        drafts[key] = draft.to(model.device).eval()
    return drafts[key]


def generate(model, *args, draft_model=None, draft_repo=DRAFT_REPO_ID, revision=None, token=None, **kwargs):
    """``model.generate`` with ``draft_model``, else the draft of ``draft_repo`` (a staged repository's own)."""
    if draft_model is None and draft_repo is None:
        raise ValueError("pass draft_model=<a ScyllaDraftModel> (or draft_repo=<a staged draft repository>)")
    draft = draft_model if draft_model is not None else _draft_for(model, draft_repo, revision, token)
    return model.generate(*args, custom_generate=scylla_generate, draft_model=draft, **kwargs)
