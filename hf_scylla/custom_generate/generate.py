"""Scylla as a ``custom_generate`` folder: ``model.generate(custom_generate=hf_scylla.CUSTOM_GENERATE_DIR,
trust_remote_code=True, draft_model=draft, ...)``; the same decoding as ``custom_generate=scylla_generate``."""

from hf_scylla.generation import scylla_generate


def generate(model, draft_model, scylla_stats=None, **generate_arguments):
    """Called by transformers with the raw ``generate`` arguments; runs Scylla speculative decoding."""
    return model.generate(
        custom_generate=scylla_generate,
        draft_model=draft_model,
        scylla_stats=scylla_stats,
        **generate_arguments,
    )
