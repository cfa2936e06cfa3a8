"""The pieces of an open_clip text tower that PromptEncoder needs, and a functional transformer layer over them.

The fast paths (truncation, shared prefix) are exact only for a causal text transformer read at its end-of-text
token (OpenAI CLIP and open_clip's CLIP models, DESIGN.md items 2-3). `TextTower.fast_path_reason` says why a tower
cannot take them (then PromptEncoder uses the plain full-context path); `TextTower.from_model` refuses a tower that
cannot take learned context vectors at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastprompt.errors import FastPromptError


@dataclass
class TextTower:
    """Handles on the frozen modules of a text tower (shared with the open_clip model, not copied)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eot_token_id: int | None
    context_length: int
    fast_path_reason: str | None  # None when the truncated and shared-prefix paths are exact

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.resblocks

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (open_clip's cast dtype)."""
        return self.transformer.get_cast_dtype() if hasattr(self.transformer, "get_cast_dtype") else self.dtype

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer) -> TextTower:
        """Collect the text tower of an open_clip `CLIP` or a `CustomTextCLIP` with a `TextTransformer`.

        Raises:
            FastPromptError: the tower has no token embedding to put context vectors into (e.g. a Hugging Face tower).
        """
        owner = model if hasattr(model, "token_embedding") else getattr(model, "text", None)
        if owner is None or not hasattr(owner, "token_embedding") or not hasattr(owner, "transformer"):
            raise FastPromptError(
                f"The text tower of this model ({type(getattr(model, 'text', model)).__name__}) has no token "
                "embedding that learned context vectors can replace; prompt tuning needs an open_clip CLIP text "
                "transformer (e.g. RN50, ViT-B-16)."
            )
        if getattr(owner, "cls_emb", None) is not None:
            raise FastPromptError(
                "This text tower appends a class token (CoCa style); prompt tuning here supports CLIP-style towers."
            )
        pool_type = getattr(owner, "text_pool_type", None) or getattr(owner, "pool_type", "argmax")
        eot_id = getattr(tokenizer, "eot_token_id", None)
        reason = _fast_path_reason(owner, pool_type, eot_id)
        return cls(
            token_embedding=owner.token_embedding,
            positional_embedding=owner.positional_embedding,
            transformer=owner.transformer,
            ln_final=owner.ln_final,
            text_projection=getattr(owner, "text_projection", None),
            attn_mask=getattr(owner, "attn_mask", None),
            pool_type=pool_type,
            eot_token_id=eot_id,
            context_length=int(owner.positional_embedding.shape[0]),
            fast_path_reason=reason,
        )

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Final projection of pooled states (..., W) -> (..., E)."""
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Module):
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def pool(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Pool (B, L, W) final states as open_clip does for this tower (argmax / eos / first / last)."""
        rows = torch.arange(states.shape[0], device=states.device)
        if self.pool_type == "argmax":
            return states[rows, tokens.argmax(dim=-1)]
        if self.pool_type == "eos":
            return states[rows, (tokens == self.eot_token_id).int().argmax(dim=-1)]
        if self.pool_type == "first":
            return states[:, 0]
        if self.pool_type == "last":
            return states[:, -1]
        return states


def _fast_path_reason(owner: nn.Module, pool_type: str, eot_id: int | None) -> str | None:
    if getattr(owner, "attn_mask", None) is None:
        return "its attention is not causal"
    if pool_type not in ("argmax", "eos"):
        return f"it pools the '{pool_type}' token, not the end-of-text token"
    if getattr(owner, "use_pad_mask", False):
        return "it masks padding"
    for block in owner.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None or attn.bias_k is not None:
            return f"its blocks ({type(block).__name__}) are not standard CLIP attention blocks"
        if hasattr(block, "ln_1_kv"):
            return "its blocks use cross-attention"
    if eot_id is None:
        return "its tokenizer has no end-of-text token id"
    return None


def split_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, W) -> (..., heads, L, W / heads)."""
    *lead, length, width = states.shape
    return states.reshape(*lead, length, heads, width // heads).transpose(-2, -3)


def merge_heads(states: torch.Tensor) -> torch.Tensor:
    """(..., heads, L, d) -> (..., L, heads * d)."""
    *lead, heads, length, dim = states.shape
    return states.transpose(-2, -3).reshape(*lead, length, heads * dim)


def qkv_rows(block: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """The fused query/key/value projection (..., 3W) of normed states (..., W)."""
    return F.linear(normed, block.attn.in_proj_weight, block.attn.in_proj_bias)


def qkv(block: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values (..., heads, L, d) of a standard block's attention for normed states (..., L, W)."""
    query, key, value = qkv_rows(block, normed).chunk(3, dim=-1)
    heads = block.attn.num_heads
    return split_heads(query, heads), split_heads(key, heads), split_heads(value, heads)


def attention_output(block: nn.Module, context: torch.Tensor) -> torch.Tensor:
    """Output projection of merged heads (..., heads, L, d) -> (..., L, W)."""
    return F.linear(merge_heads(context), block.attn.out_proj.weight, block.attn.out_proj.bias)


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool, True where attention is allowed (key position <= query position)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention over (..., heads, L, d), written out so that torch.func can batch its backward."""
    scale = query.shape[-1] ** -0.5
    scores = (query * scale) @ key.transpose(-1, -2)
    scores = scores.masked_fill(~causal_mask(query.shape[-2], query.device), float("-inf"))
    return scores.softmax(dim=-1).to(value.dtype) @ value


def mlp_residual(block: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """The second half of a block: states + ls_2(mlp(ln_2(states)))."""
    return states + block.ls_2(block.mlp(block.ln_2(states)))


def causal_block(block: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """One standard CLIP residual block with causal attention over (B, L, W) states."""
    query, key, value = qkv(block, block.ln_1(states))
    states = states + block.ls_1(attention_output(block, causal_attention(query, key, value)))
    return mlp_residual(block, states)
