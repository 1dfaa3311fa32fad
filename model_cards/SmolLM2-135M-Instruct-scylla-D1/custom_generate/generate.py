"""Scylla speculative decoding (arXiv 2505.07858) as a transformers ``custom_generate`` recipe.

``target.generate(input_ids, custom_generate="hf-adamas-scylla-vrgd/SmolLM2-135M-Instruct-scylla-D1", trust_remote_code=True, max_new_tokens=...)``
loads the Scylla draft head stored in this repository (from the same ``revision`` you pass to
``generate``, if any) and runs transformers' assisted decoding with it through the ``hf_scylla``
package (see requirements.txt). Output equals the target's own decoding; only speed changes.
"""

import weakref

from hf_scylla import ScyllaDraftModel
from hf_scylla.generation import scylla_generate

DRAFT_REPO_ID = "hf-adamas-scylla-vrgd/SmolLM2-135M-Instruct-scylla-D1"

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
    """``model.generate`` with this repository's Scylla draft (or ``draft_model``; ``draft_repo`` to load another)."""
    draft = draft_model if draft_model is not None else _draft_for(model, draft_repo, revision, token)
    return model.generate(*args, custom_generate=scylla_generate, draft_model=draft, **kwargs)
