"""Dynamic draft trees (EAGLE-2) verified in one target forward with a 4D tree attention mask.

Each cycle the draft expands, level by level, the ``top_k`` most confident nodes (by cumulative draft
log-probability), each into its ``top_k`` best children; the pool is then reranked to the
``total_tokens`` best nodes. The target reads the last accepted token plus the whole tree in one
forward of its own model class: a float ``(1, 1, T, past + T)`` mask lets each node see the cache, its
ancestors and itself, and ``position_ids`` give each node its depth. The longest path the target
accepts is kept; the target's KV cache is compacted to it and the draft's cache is cropped back to the
positions it computed from true target features (EAGLE recomputes the rest).

Greedy acceptance walks down the tree following the target's argmax. Sampling draws each node's
children without replacement from the draft distribution (Gumbel top-k) and accepts with the
multi-candidate rule of SpecInfer/Sequoia: try the children in sample order, accept child x with
probability ``min(1, r(x) / q(x))``, otherwise set ``r <- norm(max(r - q, 0))`` and drop x from ``q``;
with every child rejected the next token is drawn from ``r``. That keeps the target's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_common.compat import cache_kwargs, crop_cache
from hf_scylla.candidate_generator import ScyllaStats
from hf_scylla.modeling import ScyllaDraftModel

__all__ = ["DraftTree", "TreeConfig", "check_tree_fits", "reference_tree_decode", "tree_decode"]


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the EAGLE-2 dynamic draft tree.

    Args:
        depth: draft levels (longest path the target can accept in one cycle, bonus token excluded).
        top_k: nodes expanded per level, and children drafted per expanded node.
        total_tokens: draft tokens the target verifies per cycle (the rerank budget).
    """

    depth: int = 4
    top_k: int = 4
    total_tokens: int = 16

    def __post_init__(self):
        for name in ("depth", "top_k", "total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"tree {name} must be >= 1, got {getattr(self, name)}")


def check_tree_fits(tree: TreeConfig, target: PreTrainedModel, prompt_length: int, draft_vocab: int) -> None:
    """Clear errors for a tree the target cannot verify: more tokens than its context, wider than the vocab."""
    context = getattr(target.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and prompt_length + tree.total_tokens + 1 > context:
        raise ValueError(
            f"A tree of {tree.total_tokens} tokens after a {prompt_length}-token prompt needs "
            f"{prompt_length + tree.total_tokens + 1} positions in one verification, more than the target's "
            f"context of {context}; lower total_tokens"
        )
    if tree.top_k > draft_vocab:
        raise ValueError(f"tree top_k={tree.top_k} exceeds the draft's vocabulary of {draft_vocab} tokens")


@dataclass
class DraftTree:
    """Draft tokens in creation order (a parent always before its children, siblings in draft order).

    ``parents[i]`` is the index of node i's parent, -1 for the root (the last accepted token);
    ``depths[i]`` is 1 for the root's children. ``child_distributions`` maps each expanded node (-1:
    the root) to the draft distribution its children were drawn from (sampling only).
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    child_distributions: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> list[int]:
        return [index for index, parent in enumerate(self.parents) if parent == node]

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node`` (empty for the root)."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def ancestry_mask(self) -> torch.Tensor:
        """``(T, T)`` bool: node i sees node j when j is i or one of its ancestors."""
        mask = torch.eye(len(self), dtype=torch.bool)
        for index, parent in enumerate(self.parents):
            if parent != -1:
                mask[index] |= mask[parent]
        return mask


class _Expansion:
    """One EAGLE-2 expansion: draft the tree from the root's draft logits and feature.

    ``step(frontier, parent_features)`` runs the draft on the frontier nodes and returns their
    ``(features, logits)``; the cached fast path and the cache-free reference differ only there.
    """

    def __init__(self, tree: TreeConfig, do_sample: bool, processor, prefix: torch.Tensor):
        self.config, self.do_sample, self.processor, self.prefix = tree, do_sample, processor, prefix
        self.tree = DraftTree()
        self.scores: list[float] = []

    def _log_q(self, node: int, logits: torch.Tensor) -> torch.Tensor:
        """Log of the draft distribution the node's children come from (sampling: under the processors)."""
        logits = logits.float()
        if self.do_sample:
            path_tokens = [self.tree.tokens[i] for i in self.tree.path(node)]
            prefix = torch.cat([self.prefix, torch.tensor([path_tokens], dtype=torch.long)], dim=1)
            logits = self.processor(prefix.to(logits.device), logits[None])[0]
        return logits.log_softmax(dim=-1)

    def add_children(self, node: int, logits: torch.Tensor, depth: int) -> list[int]:
        """Draft ``top_k`` children of ``node``: the best, or (sampling) a sample without replacement."""
        log_q = self._log_q(node, logits)
        keys = log_q
        if self.do_sample:  # Gumbel top-k: a sequential sample without replacement, in sample order
            keys = log_q - torch.empty_like(log_q).exponential_().log()
            self.tree.child_distributions[node] = log_q.exp()
        count = min(self.config.top_k, int(torch.isfinite(log_q).sum()))
        chosen = keys.topk(count).indices.tolist()
        parent_score = self.scores[node] if node != -1 else 0.0
        # The j-th child scores the j-th largest draft log-probability: the best children in greedy mode;
        # in sampling mode a score that never depends on the child drawn, so whether the j-th draw is
        # verified never depends on its own token (that would bias the rejection rule). Scores never rise
        # along siblings or depth, so a top-N rerank keeps ancestors and earlier siblings.
        ranked = log_q.topk(count).values.tolist()
        added = []
        for token, log_probability in zip(chosen, ranked, strict=True):
            self.tree.tokens.append(token)
            self.tree.parents.append(node)
            self.tree.depths.append(depth)
            self.scores.append(parent_score + log_probability)
            added.append(len(self.tree) - 1)
        return added

    def run(self, root_logits: torch.Tensor, root_feature: torch.Tensor, depth: int, step) -> DraftTree:
        frontier = self.add_children(-1, root_logits, 1)
        frontier_features = root_feature.expand(len(frontier), -1)
        for level in range(2, depth + 1):
            features, logits = step(frontier, frontier_features)
            candidates = []
            for row, node in enumerate(frontier):
                children = self.add_children(node, logits[row], level)
                candidates += [(child, row) for child in children]
            if level == depth or not candidates:
                break
            best = sorted(candidates, key=lambda item: -self.scores[item[0]])[: self.config.top_k]
            best.sort()  # creation order: a frontier's parents come first in the draft cache
            frontier = [child for child, _ in best]
            frontier_features = features[[row for _, row in best]]
        return self._rerank()

    def _rerank(self) -> DraftTree:
        """Keep the ``total_tokens`` best nodes (ties: earlier nodes), renumbered in creation order."""
        order = sorted(range(len(self.tree)), key=lambda index: (-self.scores[index], index))
        kept = sorted(order[: self.config.total_tokens])
        renumber = {old: new for new, old in enumerate(kept)} | {-1: -1}
        tree = DraftTree(
            tokens=[self.tree.tokens[i] for i in kept],
            parents=[renumber[self.tree.parents[i]] for i in kept],
            depths=[self.tree.depths[i] for i in kept],
            child_distributions={
                renumber[node]: q for node, q in self.tree.child_distributions.items() if node in renumber
            },
        )
        return tree


def _tree_mask(ancestry: torch.Tensor, past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive ``(1, 1, T, past + T)`` mask: 0 where a query may attend, the dtype's minimum elsewhere."""
    allowed = torch.cat([torch.ones(len(ancestry), past, dtype=torch.bool), ancestry], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def _accept(
    tree: DraftTree,
    target_logits: torch.Tensor,
    prefix: torch.Tensor,
    processor: LogitsProcessorList,
    do_sample: bool,
) -> tuple[list[int], int]:
    """Walk the tree with the target's logits (row 0: the root, row i+1: node i): accepted nodes, next token."""
    node, path = -1, []
    while True:
        path_tokens = [tree.tokens[i] for i in path]
        node_prefix = torch.cat([prefix, torch.tensor([path_tokens], dtype=torch.long)], dim=1)
        logits = processor(node_prefix.to(target_logits.device), target_logits[node + 1][None].float())[0]
        children = tree.children(node)
        if not do_sample:
            best = int(logits.argmax())
            match = [child for child in children if tree.tokens[child] == best]
            if not match:
                return path, best
            node = match[0]
            path.append(node)
            continue
        residual = logits.softmax(dim=-1)
        if not children:
            return path, int(torch.multinomial(residual, 1))
        q = tree.child_distributions[node].to(residual.device).clone()
        for child in children:
            token = tree.tokens[child]
            if float(torch.rand(())) * float(q[token]) <= float(residual[token]):
                node = child
                path.append(child)
                break
            residual = (residual - q).clamp(min=0)
            residual = residual / residual.sum()
            q[token] = 0
            q = q / q.sum()
        else:
            return path, int(torch.multinomial(residual, 1))


def _check_tree_call(model: PreTrainedModel, generation_config: GenerationConfig, model_kwargs: dict) -> None:
    """Refuse what the tree loop does not serve (instead of silently ignoring it)."""
    implementation = model.config._attn_implementation or "eager"
    if implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"Tree decoding passes a 4D tree attention mask, which needs attn_implementation 'sdpa' or "
            f"'eager', not {implementation!r}"
        )
    unsupported = [
        name
        for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
        if getattr(generation_config, name, False)
    ]
    if unsupported:
        raise ValueError(f"Tree decoding returns sequences only; {', '.join(unsupported)} is not supported")
    if generation_config.num_beams not in (None, 1):
        raise ValueError("Tree decoding is a speculative greedy/sampling loop; num_beams must be 1")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("Tree decoding serves one unpadded sequence; the attention_mask has padding")


@torch.no_grad()
def tree_decode(
    model: PreTrainedModel,
    draft: ScyllaDraftModel,
    input_ids: torch.LongTensor,
    tree: TreeConfig,
    generation_config: GenerationConfig,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    stats: ScyllaStats | None = None,
    **model_kwargs,
) -> torch.LongTensor | GenerateDecoderOnlyOutput:
    """Speculative decoding of one sequence with EAGLE-2 dynamic draft trees (see the module docstring).

    Called by `hf_scylla.generation.scylla_generate` when it gets ``tree=``; ``logits_processor`` and
    ``stopping_criteria`` are the ones ``generate()`` prepared, applied exactly as plain decoding does.
    """
    if not draft.is_attached:
        raise ValueError("The draft has no embedding/LM head yet: call draft.attach_target(target) first")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"Tree decoding serves batch size 1, got batch size {input_ids.shape[0]}; "
            "hf_scylla.batched_generate is chain-only"
        )
    _check_tree_call(model, generation_config, model_kwargs)
    check_tree_fits(tree, model, input_ids.shape[1], draft.config.draft_vocab_size or draft.config.vocab_size)
    processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    stats = stats if stats is not None else ScyllaStats()
    do_sample = bool(generation_config.do_sample)
    layers = draft.feature_layers(model.config)
    max_length = generation_config.max_length
    cache, draft_cache = DynamicCache(config=model.config), draft.new_cache()
    _check_cache_layers(cache)

    out = model(input_ids, output_hidden_states=layers, use_cache=True, **cache_kwargs(cache))
    sequence = input_ids
    new_tokens = [_next_token(processor(sequence, out.logits[:, -1].float())[0], do_sample)]
    new_features = draft.target_features(out.hidden_states)
    while True:
        sequence, finished = _append(sequence, new_tokens, stopping)
        if finished:
            break
        # Sync the draft on the new (h_t, x_{t+1}) pairs; its last output drafts the tree's first level.
        synced = draft_cache.get_seq_length()
        step = draft(
            sequence[:, synced + 1 :].to(draft.device),
            new_features.to(draft.device),
            cache=draft_cache,
            logits_to_keep=1,
        )
        synced = draft_cache.get_seq_length()
        past = cache.get_seq_length()
        depth = min(tree.depth, max_length - sequence.shape[1] - 1)
        draft_tree = DraftTree()
        if depth >= 1:
            draft_tree = _draft_tree_cached(
                draft, draft_cache, step, tree, depth, do_sample, processor, sequence
            )
        crop_cache(draft_cache, synced)

        tokens = torch.tensor([[int(sequence[0, -1]), *draft_tree.tokens]], device=sequence.device)
        ancestry = torch.zeros(len(draft_tree) + 1, len(draft_tree) + 1, dtype=torch.bool)
        ancestry[:, 0] = True
        ancestry[1:, 1:] = draft_tree.ancestry_mask()
        positions = past + torch.tensor([[0, *draft_tree.depths]], device=sequence.device)
        out = model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=_tree_mask(ancestry, past, model.dtype, sequence.device),
            output_hidden_states=layers,
            use_cache=True,
            **cache_kwargs(cache),
        )
        path, bonus = _accept(draft_tree, out.logits[0], sequence, processor, do_sample)
        if len(draft_tree):
            stats.record(max(draft_tree.depths), len(path))
        keep = torch.tensor([0, *(node + 1 for node in path)], device=sequence.device)
        _compact(cache, past, keep)
        new_features = draft.target_features(out.hidden_states)[:, keep]
        new_tokens = [draft_tree.tokens[node] for node in path] + [bonus]
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequence)
    return sequence


def _draft_tree_cached(draft, draft_cache, step, tree, depth, do_sample, processor, sequence) -> DraftTree:
    """EAGLE-2 expansion with the draft's KV cache: each level's frontier in one draft forward."""
    synced = draft_cache.get_seq_length()
    fed: list[int] = []  # tree node of each draft-cache entry past ``synced``
    expansion = _Expansion(tree, do_sample, processor, sequence)

    def forward(frontier: list[int], parent_features: torch.Tensor):
        fed.extend(frontier)
        sees = torch.tensor(
            [[other in expansion.tree.path(node) for other in fed] for node in frontier], dtype=torch.bool
        )
        allowed = torch.cat([torch.ones(len(frontier), synced, dtype=torch.bool), sees], dim=1)
        dtype = draft.fc.weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        depths = torch.tensor([expansion.tree.depths[node] for node in frontier])
        out = draft(
            torch.tensor([[expansion.tree.tokens[node] for node in frontier]], device=draft.device),
            parent_features[None],
            position_ids=(synced + depths - 1)[None].to(draft.device),
            cache=draft_cache,
            attention_mask=mask[None, None].to(draft.device),
        )
        return out.features[0], out.logits[0]

    return expansion.run(step.logits[0, -1], step.features[0, -1], depth, forward)


def _next_token(logits: torch.Tensor, do_sample: bool) -> int:
    return int(torch.multinomial(logits.softmax(-1), 1)) if do_sample else int(logits.argmax())


def _append(
    sequence: torch.LongTensor, tokens: list[int], stopping: StoppingCriteriaList
) -> tuple[torch.LongTensor, bool]:
    """Append ``tokens`` one at a time, as plain decoding would, stopping where its criteria stop."""
    for token in tokens:
        sequence = torch.cat([sequence, sequence.new_tensor([[token]])], dim=1)
        if len(stopping) and bool(stopping(sequence, None).any()):
            return sequence, True
    return sequence, False


def _check_cache_layers(cache: DynamicCache) -> None:
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise ValueError(
            "Tree decoding compacts full KV caches; sliding-window attention layers are not supported"
        )


def _compact(cache: DynamicCache, past: int, keep: torch.Tensor) -> None:
    """Keep the first ``past`` cache positions plus the verified positions ``past + keep``, in order."""
    index = torch.cat([torch.arange(past, device=keep.device), past + keep])
    for cache_layer in cache.layers:
        if cache_layer.is_initialized:
            cache_layer.keys = cache_layer.keys.index_select(-2, index.to(cache_layer.keys.device))
            cache_layer.values = cache_layer.values.index_select(-2, index.to(cache_layer.values.device))


@torch.no_grad()
def reference_tree_decode(
    target: PreTrainedModel,
    draft: ScyllaDraftModel,
    input_ids: torch.Tensor,
    tree: TreeConfig,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Greedy tree decoding with no cache anywhere: the spec `tree_decode` is tested against.

    The draft re-runs every ``(h_t, x_{t+1})`` pair along each node's path; the target re-runs the whole
    sequence for every root-to-leaf path and the longest greedily accepted prefix wins. Returns the
    sequence and ``(tree depth, accepted)`` per cycle.
    """
    max_length = input_ids.shape[1] + max_new_tokens
    sequence, cycles = input_ids, []
    sequence = torch.cat([sequence, target(sequence).logits[:, -1:].argmax(-1)], dim=1)
    while sequence.shape[1] < max_length and not (
        eos_token_id is not None and sequence[0, -1] == eos_token_id
    ):
        features = draft.target_features(target(sequence[:, :-1], output_hidden_states=True).hidden_states)
        depth = min(tree.depth, max_length - sequence.shape[1] - 1)
        draft_tree = DraftTree()
        if depth >= 1:
            root = draft(sequence[:, 1:], features)
            expansion = _Expansion(tree, False, LogitsProcessorList(), sequence)
            computed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

            def after(
                node: int,
                expansion=expansion,
                root=root,
                features=features,
                sequence=sequence,
                computed=computed,
            ):
                """The draft's (feature, logits) at ``node``'s pair, recomputed along its whole path."""
                if node in computed:
                    return computed[node]
                path = expansion.tree.path(node)
                inputs = [root.features[0, -1], *(after(ancestor)[0] for ancestor in path[:-1])]
                tokens = torch.tensor([[expansion.tree.tokens[i] for i in path]], dtype=torch.long)
                out = draft(
                    torch.cat([sequence[:, 1:], tokens], dim=1),
                    torch.cat([features, torch.stack(inputs)[None]], dim=1),
                )
                computed[node] = (out.features[0, -1], out.logits[0, -1])
                return computed[node]

            def forward(frontier, parent_features, after=after):
                rows = [after(node) for node in frontier]
                return torch.stack([row[0] for row in rows]), torch.stack([row[1] for row in rows])

            draft_tree = expansion.run(root.logits[0, -1], root.features[0, -1], depth, forward)
        best_path, best_next = [], None
        leaves = [node for node in range(len(draft_tree)) if not draft_tree.children(node)] or [-1]
        for leaf in leaves:
            path = draft_tree.path(leaf)
            candidate = torch.cat(
                [sequence, torch.tensor([[draft_tree.tokens[i] for i in path]], dtype=torch.long)], dim=1
            )
            predicted = target(candidate).logits[0, sequence.shape[1] - 1 :].argmax(-1).tolist()
            accepted = 0
            while accepted < len(path) and draft_tree.tokens[path[accepted]] == predicted[accepted]:
                accepted += 1
            if best_next is None or accepted > len(best_path):
                best_path, best_next = path[:accepted], predicted[accepted]
        new_tokens = [*(draft_tree.tokens[i] for i in best_path), best_next][: max_length - sequence.shape[1]]
        if eos_token_id is not None and eos_token_id in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(eos_token_id) + 1]
        if len(draft_tree):
            cycles.append((max(draft_tree.depths), len(new_tokens) - 1))
        sequence = torch.cat([sequence, torch.tensor([new_tokens])], dim=1)
    return sequence, cycles
