"""Helpers shared by the test modules: the relative-RMS tolerance check, tiny word tokenizers, lm-eval requests.

Tiny models come from `scylla_models` (targets and drafts) and the ``tiny_config`` fixtures in
``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers.tokenization_utils_tokenizers import TokenizersBackend

__all__ = [
    "WORDS",
    "assert_close",
    "chat_word_tokenizer",
    "generate_requests",
    "get_err_ratio",
    "lm_eval_requests",
    "plain_hflm",
    "random_words",
    "save_with_tokenizer",
    "word_tokenizer",
]

WORDS = [f"w{index}" for index in range(128)]
"""The vocabulary of the tiny models: token id ``i`` is the word ``w<i>``."""


def get_err_ratio(ref: torch.Tensor, tri: torch.Tensor) -> float:
    """``rms(ref - tri) / rms(ref)``."""
    return ((ref - tri).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, ratio: float) -> None:
    """Relative-RMS comparison (flash-linear-attention style), reporting max-abs error and the ratio."""
    ref, tri = ref.detach().float(), tri.detach().float()
    assert ref.shape == tri.shape, f"{name}: shape {tuple(tri.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(tri).any(), f"{name}: NaN in output"
    abs_err = (ref - tri).abs().max().item() if ref.numel() else 0.0
    err = get_err_ratio(ref, tri)
    msg = f"{name}: max abs err {abs_err:.3e}, rms ratio {err:.3e} (allowed {ratio})"
    assert abs_err <= 1e-6 or err <= ratio, msg


def word_tokenizer(words: Sequence[str] = WORDS, *, special_tokens: bool = False) -> TokenizersBackend:
    """Word-level tokenizer over ``words`` (split on whitespace), word ``i`` is id ``i``.

    With ``special_tokens``: pad ``words[0]``, bos ``words[1]``, eos ``words[2]``, unk ``words[3]``, the
    ids the tiny models use; else ``words[0]`` stands for unknown words.
    """
    unknown = words[3] if special_tokens else words[0]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token=unknown))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = (
        {"pad_token": words[0], "bos_token": words[1], "eos_token": words[2], "unk_token": words[3]}
        if special_tokens
        else {}
    )
    return TokenizersBackend(tokenizer_object=tokenizer, **specials)


def chat_word_tokenizer() -> TokenizersBackend:
    """`word_tokenizer` over `WORDS` whose chat template joins the message contents, then ``w3``."""
    backend = word_tokenizer()
    backend.chat_template = "{% for message in messages %}{{ message['content'] }} {% endfor %}w3"
    return backend


def random_words(seed: int, count: int) -> str:
    """``count`` words of `WORDS` (none of the four special ones), the same for the same ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(4, 128, (count,), generator=generator))


def save_with_tokenizer(model: torch.nn.Module, folder: Path) -> Path:
    """``model`` saved with `word_tokenizer` (special tokens on) into ``folder``, which is returned."""
    model.save_pretrained(folder)
    word_tokenizer(special_tokens=True).save_pretrained(folder)
    return folder


def plain_hflm(folder: Path):
    """lm-eval's own ``hf`` model on a saved checkpoint (sdpa attention): the reference of our backends."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    return HFLM(pretrained=model, tokenizer=word_tokenizer(special_tokens=True), batch_size=1)


def lm_eval_requests(request_type: str, arguments: Sequence[tuple]) -> list:
    """lm-eval `Instance` requests of one type, one per argument tuple."""
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type=request_type, doc={}, arguments=args, idx=index)
        for index, args in enumerate(arguments)
    ]


def generate_requests(contexts: list[str], until: list[str], max_gen_toks: int = 24) -> list:
    """Greedy ``generate_until`` requests over ``contexts``."""
    gen_kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    return lm_eval_requests("generate_until", [(context, dict(gen_kwargs)) for context in contexts])
