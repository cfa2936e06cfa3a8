"""PromptEncoder: text features of K class prompts for P learned contexts at once, by the fastest exact path.

Three paths compute the same function of the context (DESIGN.md items 2-3):

- `reference`: the plain path, the model's own transformer over the full context (77 tokens for CLIP).
- `truncated`: the causal mask means positions after the last end-of-text token never influence the result, so the
  sequence is cut there (77 -> about 20 tokens). Serves "middle" and "front" positions and class-specific contexts.
- `shared_prefix`: with one context shared by all classes and the class name after it, every token before the first
  class-dependent token has the same hidden state in every prompt. The prefix (start token, context, fixed template
  tokens) is computed once per context and layer; each class's suffix (name, ".", end-of-text) attends to the prefix's
  keys and values and causally to itself. Suffixes are bucketed by length so that padding stays small; padding goes
  after the end-of-text token, where the causal mask hides it.

All three are differentiable in the context; the model's weights are frozen, so backward computes input gradients only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from fastprompt.errors import FastPromptError
from fastprompt.prompt import POSITIONS, PromptLayout, build_layout, clean_classname, random_context, template_context
from fastprompt.text_tower import (
    TextTower,
    causal_attention,
    causal_block,
    causal_mask,
    merge_heads,
    mlp_residual,
    qkv_rows,
    split_heads,
)


@dataclass(frozen=True)
class Bucket:
    """Classes whose suffixes are padded to one length. `classes` index the encoder's class list."""

    classes: torch.Tensor  # (Kb,) int64
    length: int  # padded suffix length Ls
    eot_offset: torch.Tensor  # (Kb,) int64, end-of-text position within the suffix


def plan_buckets(lengths: list[int], overhead_tokens: int = 32) -> list[list[int]]:
    """Group classes by suffix length to minimise padded tokens plus a per-bucket overhead.

    Dynamic programming over the sorted distinct lengths: cost = sum over buckets of (classes x padded length) +
    overhead_tokens per bucket (each bucket costs separate kernel launches).

    Args:
        lengths: suffix length of each class.
        overhead_tokens: the cost of one more bucket, in tokens.

    Returns:
        Lists of class indices, one list per bucket, in increasing length.
    """
    distinct = sorted(set(lengths))
    counts = [sum(1 for length in lengths if length == value) for value in distinct]
    n = len(distinct)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        members = 0
        for start in range(end - 1, -1, -1):
            members += counts[start]
            cost = best[start] + members * distinct[end - 1] + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        start = cut[end]
        allowed = set(distinct[start:end])
        groups.append([k for k, length in enumerate(lengths) if length in allowed])
        end = start
    return groups[::-1]


class PromptEncoder:
    """Text features (P, K, E) of K class prompts for P contexts, before normalisation.

    Args:
        clip: a `fastprompt.Clip` (or anything with `.model` and `.tokenizer` of open_clip).
        classnames: the K class names (`_` becomes a space).
        n_ctx: number of learnable context vectors M.
        position: where the class name goes: "end" (default), "middle" or "front".
        class_specific: one context per class, input (P, K, M, W), instead of one shared context (P, M, W).
        prompt_prefix: the template words before the class name for ProGrad's initialisation (e.g. "a type of pet,
            a photo of a"), or None for CoOp's placeholders.
        bucket_overhead_tokens: the padding, in tokens, worth one more suffix bucket.

    Example:
        >>> encoder = PromptEncoder(clip, ["cat", "dog"], n_ctx=16, prompt_prefix="a photo of a")
        >>> ctx = encoder.initial_context("template").expand(3, -1, -1)   # (P=3, 16, W)
        >>> features = encoder(ctx)                                       # (3, 2, E)
    """

    def __init__(
        self,
        clip,
        classnames: list[str],
        n_ctx: int = 16,
        position: str = "end",
        class_specific: bool = False,
        prompt_prefix: str | None = None,
        bucket_overhead_tokens: int = 32,
    ) -> None:
        if isinstance(classnames, str) or not isinstance(classnames, (list, tuple)):
            raise FastPromptError("classnames must be a list of class names.")
        self.tower = TextTower.from_model(clip.model, clip.tokenizer)
        self.classnames = [clean_classname(str(name)) for name in classnames]
        self.n_ctx = n_ctx
        self.position = position
        self.class_specific = class_specific
        self.prompt_prefix = prompt_prefix
        self.layout: PromptLayout = build_layout(
            clip.tokenizer, self.classnames, n_ctx, position, prompt_prefix, self.tower.context_length
        )
        self.device = self.tower.token_embedding.weight.device
        self.bucket_overhead_tokens = bucket_overhead_tokens
        self.num_classes = len(self.classnames)
        self.width = self.tower.width
        self.truncated_length = int(self.layout.eot_index.max()) + 1
        with torch.no_grad():
            tokens = self.layout.tokens[:, : self.truncated_length].to(self.device)
            # Fixed token embeddings of every prompt up to the last end-of-text token; context slots are overwritten.
            self.fixed_embeddings = self.tower.token_embedding(tokens).to(self.tower.compute_dtype)
        self.ctx_slot = self.layout.ctx_slot[:, : self.truncated_length].to(self.device)
        self.prefix_length = self._shared_prefix_length()
        self._plan = lru_cache(maxsize=16)(self._make_buckets)

    # ----------------------------------------------------------------------------------------------- public
    @property
    def path(self) -> str:
        """The path `__call__` takes: "shared_prefix", "truncated" or "reference"."""
        if self.tower.fast_path_reason is not None:
            return "reference"
        if self.position == "end" and not self.class_specific:
            return "shared_prefix"
        return "truncated"

    def __call__(self, ctx: torch.Tensor, class_index: torch.Tensor | None = None) -> torch.Tensor:
        """Text features (P, K, E) by the fastest exact path; `class_index` restricts (and orders) the classes."""
        if self.path == "shared_prefix":
            return self.shared_prefix(ctx, class_index)
        if self.path == "truncated":
            return self.truncated(ctx, class_index)
        return self.reference(ctx, class_index)

    def initial_context(self, kind: str = "template", generator: torch.Generator | None = None) -> torch.Tensor:
        """The initial context, fp32 on the encoder's device: (M, W), or (K, M, W) when class-specific.

        Args:
            kind: "template" (ProGrad: the template's token embeddings, zeros at the placeholders) or "random"
                (CoOp: normal, std 0.02).
            generator: random generator for "random".
        """
        if kind == "template":
            if self.position != "end":
                raise FastPromptError("Template initialisation needs the class name at the end (position 'end').")
            rows = template_context(self.tower.token_embedding, self.layout, self.n_ctx)
            if self.class_specific:
                rows = rows.expand(self.num_classes, -1, -1).clone()
        elif kind == "random":
            shape_k = self.num_classes if self.class_specific else 1
            rows = torch.stack([random_context(self.n_ctx, self.width, generator) for _ in range(shape_k)])
            rows = rows if self.class_specific else rows[0]
        else:
            raise FastPromptError(f"Unknown initialisation '{kind}'; use 'template' or 'random'.")
        return rows.to(self.device, torch.float32)

    def fixed_suffix_tokens(self) -> torch.Tensor:
        """Token ids after the context for class 0 up to its end-of-text token (shows leftover template tokens)."""
        end = int(self.layout.eot_index[0]) + 1
        return self.layout.tokens[0, 1 + self.n_ctx : end]

    # ------------------------------------------------------------------------------------------------ paths
    def reference(self, ctx: torch.Tensor, class_index: torch.Tensor | None = None) -> torch.Tensor:
        """The plain path: the model's own transformer over the full context length (77 tokens for CLIP)."""
        classes = self._classes(class_index)
        ctx = self._check(ctx)
        length = self.tower.context_length
        tokens = self.layout.tokens[classes.cpu()].to(self.device)
        slot = self.layout.ctx_slot[classes.cpu()].to(self.device)
        with torch.no_grad():
            fixed = self.tower.token_embedding(tokens).to(self.tower.compute_dtype)
        states = self._insert_context(ctx, fixed, slot, classes)  # (P, K, L, W)
        p, k = states.shape[:2]
        states = states.reshape(p * k, length, self.width) + self.tower.positional_embedding.to(states.dtype)
        mask = self.tower.attn_mask
        states = self.tower.transformer(states, attn_mask=mask)
        states = self.tower.ln_final(states)
        pooled = self.tower.pool(states, tokens.repeat(p, 1))
        return self.tower.project(pooled).reshape(p, k, -1)

    def truncated(self, ctx: torch.Tensor, class_index: torch.Tensor | None = None) -> torch.Tensor:
        """The full prompt cut after the last end-of-text token, causal blocks over (P*K, L_cut)."""
        self._require_fast_path()
        classes = self._classes(class_index)
        ctx = self._check(ctx)
        length = int(self.layout.eot_index[classes.cpu()].max()) + 1
        fixed = self.fixed_embeddings[classes, :length]
        states = self._insert_context(ctx, fixed, self.ctx_slot[classes, :length], classes)
        p, k = states.shape[:2]
        states = states.reshape(p * k, length, self.width) + self.tower.positional_embedding[:length].to(states.dtype)
        for block in self.tower.blocks:
            states = causal_block(block, states)
        eot = self.layout.eot_index[classes.cpu()].to(self.device).repeat(p)
        pooled = self.tower.ln_final(states[torch.arange(p * k, device=self.device), eot])
        return self.tower.project(pooled).reshape(p, k, -1)

    def shared_prefix(self, ctx: torch.Tensor, class_index: torch.Tensor | None = None) -> torch.Tensor:
        """Prefix once per context and layer, then every class's suffix attending to [prefix keys/values, itself]."""
        self._require_fast_path()
        if self.position != "end" or self.class_specific:
            raise FastPromptError("The shared-prefix path needs one shared context with the class name at the end.")
        classes = self._classes(class_index)
        ctx = self._check(ctx)
        p, lp = ctx.shape[0], self.prefix_length
        positional = self.tower.positional_embedding
        dtype = self.tower.compute_dtype
        prefix = self.fixed_embeddings[:1, :lp].expand(p, -1, -1)
        prefix = self._insert_context(ctx, prefix.unsqueeze(1), self.ctx_slot[:1, :lp], classes[:1])[:, 0]
        prefix = prefix + positional[:lp].to(dtype)
        buckets = self._plan(tuple(classes.tolist()))
        suffixes = []
        for bucket in buckets:
            ls = bucket.length
            fixed = self.fixed_embeddings[bucket.classes, lp : lp + ls]
            if fixed.shape[1] < ls:  # the longest suffix ends at the truncated length: pad after its eot
                fixed = torch.nn.functional.pad(fixed, (0, 0, 0, ls - fixed.shape[1]))
            positions = positional[lp : lp + ls].to(dtype)
            suffixes.append((fixed + positions).unsqueeze(0).expand(p, -1, -1, -1))
        # Position-wise work (layer norms, projections, MLP) runs on all rows at once, prefix and every bucket's
        # suffixes concatenated: a few large matrix products instead of many small ones. Only attention is split.
        shapes = [prefix.shape[:-1]] + [s.shape[:-1] for s in suffixes]
        sizes = [math.prod(shape) for shape in shapes]
        states = torch.cat([prefix.reshape(-1, self.width)] + [s.reshape(-1, self.width) for s in suffixes])
        for block in self.tower.blocks:
            parts = qkv_rows(block, block.ln_1(states)).split(sizes)
            query_p, key_p, value_p = (split_heads(t, block.attn.num_heads) for t in
                                       parts[0].view(*shapes[0], -1).chunk(3, dim=-1))  # fmt: skip
            contexts = [merge_heads(causal_attention(query_p, key_p, value_p)).reshape(sizes[0], -1)]
            for shape, size, part in zip(shapes[1:], sizes[1:], parts[1:], strict=True):
                query, key, value = (split_heads(t, block.attn.num_heads) for t in
                                     part.view(*shape, -1).chunk(3, dim=-1))  # fmt: skip
                contexts.append(merge_heads(_suffix_attention(query, key, value, key_p, value_p)).reshape(size, -1))
            attended = F.linear(torch.cat(contexts), block.attn.out_proj.weight, block.attn.out_proj.bias)
            states = mlp_residual(block, states + block.ls_1(attended))
        suffixes = [part.view(*shape, -1) for shape, part in zip(shapes[1:], states.split(sizes)[1:], strict=True)]
        pooled = []
        for bucket, states in zip(buckets, suffixes, strict=True):
            rows = torch.arange(states.shape[1], device=self.device)
            pooled.append(states[:, rows, bucket.eot_offset])  # (P, Kb, W)
        pooled = torch.cat(pooled, dim=1)
        order = torch.cat([bucket.classes for bucket in buckets])
        pooled = pooled[:, _rank(order, classes)]
        return self.tower.project(self.tower.ln_final(pooled))

    # ------------------------------------------------------------------------------------------------ helpers
    def _require_fast_path(self) -> None:
        if self.tower.fast_path_reason is not None:
            raise FastPromptError(
                f"This text tower cannot take the exact fast paths ({self.tower.fast_path_reason}); use .reference()."
            )

    def _classes(self, class_index: torch.Tensor | None) -> torch.Tensor:
        if class_index is None:
            return torch.arange(self.num_classes, device=self.device)
        class_index = torch.as_tensor(class_index, dtype=torch.long, device=self.device)
        if class_index.ndim != 1 or class_index.numel() == 0:
            raise FastPromptError("class_index must be a non-empty 1-D list of class indices.")
        if int(class_index.min()) < 0 or int(class_index.max()) >= self.num_classes:
            raise FastPromptError(f"class_index out of range for {self.num_classes} classes.")
        return class_index

    def _check(self, ctx: torch.Tensor) -> torch.Tensor:
        expected = "(P, K, n_ctx, width)" if self.class_specific else "(P, n_ctx, width)"
        if not isinstance(ctx, torch.Tensor):
            raise FastPromptError(f"The context must be a tensor of shape {expected}, got {type(ctx).__name__}.")
        if not ctx.is_floating_point():
            raise FastPromptError(f"The context must be a floating-point tensor, got dtype {ctx.dtype}.")
        tail = (self.num_classes, self.n_ctx, self.width) if self.class_specific else (self.n_ctx, self.width)
        if ctx.ndim != len(tail) + 1 or tuple(ctx.shape[1:]) != tail or ctx.shape[0] < 1:
            raise FastPromptError(
                f"The context has shape {tuple(ctx.shape)} but this encoder expects {expected} = "
                f"(P, {', '.join(map(str, tail))}); check n_ctx, the model's text width and class_specific."
            )
        return ctx.to(self.device)

    def _insert_context(
        self, ctx: torch.Tensor, fixed: torch.Tensor, slot: torch.Tensor, classes: torch.Tensor
    ) -> torch.Tensor:
        """Embeddings (P, K, L, W): `fixed` (K, L, W) with the context rows placed where slot >= 0."""
        ctx = ctx.to(fixed.dtype)
        index = slot.clamp(min=0)  # (K, L)
        if self.class_specific:
            rows = ctx[:, classes]  # (P, K, M, W)
            gathered = torch.gather(
                rows, 2, index[None, :, :, None].expand(ctx.shape[0], -1, -1, self.width)
            )  # (P, K, L, W)
        else:
            gathered = ctx[:, index]  # (P, K, L, W)
        return torch.where((slot >= 0)[None, :, :, None], gathered, fixed)

    def _shared_prefix_length(self) -> int:
        """Longest run of token positions equal in every prompt, leaving at least the end-of-text in each suffix."""
        tokens = self.layout.tokens[:, : self.truncated_length]
        same = (tokens == tokens[:1]).all(dim=0)
        differing = (~same).nonzero()
        common = int(differing[0]) if differing.numel() else self.truncated_length
        return max(1, min(common, int(self.layout.eot_index.min())))

    def _make_buckets(self, classes: tuple[int, ...]) -> list[Bucket]:
        lp = self.prefix_length
        lengths = [int(self.layout.eot_index[k]) - lp + 1 for k in classes]
        buckets = []
        for members in plan_buckets(lengths, self.bucket_overhead_tokens):
            chosen = [classes[i] for i in members]
            length = max(lengths[i] for i in members)
            eot_offset = torch.tensor([lengths[i] - 1 for i in members], device=self.device)
            buckets.append(Bucket(torch.tensor(chosen, device=self.device), length, eot_offset))
        return buckets


def _rank(order: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Position in `order` of each element of `classes` (both permutations of the same index set)."""
    lookup = torch.empty(int(order.max()) + 1, dtype=torch.long, device=order.device)
    lookup[order] = torch.arange(order.numel(), device=order.device)
    return lookup[classes]


def _suffix_attention(query, key, value, key_p, value_p) -> torch.Tensor:
    """Attention of suffix queries (P, Kb, H, Ls, d) over the shared prefix's keys/values (P, H, Lp, d) and causally
    over their own suffix. The softmax runs over [prefix, suffix] jointly, exactly as the full causal attention does."""
    p, kb, heads, ls, dim = query.shape
    lp = key_p.shape[-2]
    query = query * dim**-0.5
    # Scores against the shared prefix: one matmul per (P, H) over all Kb*Ls suffix queries.
    flat_query = query.permute(0, 2, 1, 3, 4).reshape(p, heads, kb * ls, dim)
    scores_prefix = (flat_query @ key_p.transpose(-1, -2)).reshape(p, heads, kb, ls, lp).permute(0, 2, 1, 3, 4)
    scores_self = (query @ key.transpose(-1, -2)).masked_fill(~causal_mask(ls, query.device), float("-inf"))
    weights = torch.cat([scores_prefix, scores_self], dim=-1).softmax(dim=-1).to(value.dtype)
    weights_prefix, weights_self = weights[..., :lp], weights[..., lp:]
    flat_weights = weights_prefix.permute(0, 2, 1, 3, 4).reshape(p, heads, kb * ls, lp)
    from_prefix = (flat_weights @ value_p).reshape(p, heads, kb, ls, dim).permute(0, 2, 1, 3, 4)
    return from_prefix + weights_self @ value


__all__ = ["POSITIONS", "Bucket", "PromptEncoder", "merge_heads", "plan_buckets"]
