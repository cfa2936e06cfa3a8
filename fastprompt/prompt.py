"""Prompt construction: token sequences, where the learnable context sits, and the initial context.

PROTOCOL.md section 2. For class c the prompt text is `"X " * (n_ctx - w) + prefix + " " + c + "."` where `prefix`
is the template without its `" {}."` and w its number of words (CoOp: no prefix, `"X " * n_ctx + c + "."`). The
learnable context replaces token positions 1..n_ctx; everything after position n_ctx is fixed (for comma templates
the last prefix token falls after position n_ctx and stays fixed, as in the reference). Positions "middle" and
"front" move the class name as CoOp's `class_token_position` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastprompt.errors import FastPromptError

POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"


def clean_classname(name: str) -> str:
    """Class names as the reference uses them: `_` replaced by a space, outer spaces removed."""
    return name.replace("_", " ").strip()


@dataclass(frozen=True)
class PromptLayout:
    """Token ids of every class's prompt and where the learnable context goes.

    Attributes:
        tokens: (K, L) int64 token ids, L = the model's context length; placeholders at the context slots.
        ctx_slot: (K, L) int64: j in [0, n_ctx) where the position holds context row j, else -1.
        eot_index: (K,) int64 position of the end-of-text token (where the text feature is read).
        n_placeholders: number of leading context rows that start as zeros under template initialisation.
        prompts: the prompt strings (with placeholders), for display.
    """

    tokens: torch.Tensor
    ctx_slot: torch.Tensor
    eot_index: torch.Tensor
    n_placeholders: int
    prompts: tuple[str, ...]


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text))
    raise FastPromptError(
        f"The model's tokenizer ({type(tokenizer).__name__}) cannot encode text without padding; "
        "learned context vectors need CLIP's BPE tokenizer."
    )


def build_layout(
    tokenizer,
    classnames: list[str],
    n_ctx: int,
    position: str = "end",
    prompt_prefix: str | None = None,
    context_length: int = 77,
) -> PromptLayout:
    """Tokenise every class's prompt and locate the context slots.

    Args:
        tokenizer: open_clip's tokenizer (needs `encode`, `sot_token_id`, `eot_token_id`).
        classnames: K class names (already cleaned).
        n_ctx: number of learnable context vectors M.
        position: "end", "middle" or "front" (where the class name goes).
        prompt_prefix: template words before the class name (ProGrad's initialisation), or None (CoOp).
        context_length: the text tower's context length.

    Raises:
        FastPromptError: an empty class list or name, a prefix longer than the context, a prompt over the context
            length, or a prefix with a position other than "end".
    """
    if not classnames:
        raise FastPromptError("The class list is empty; give at least one class name.")
    for index, name in enumerate(classnames):
        if not name.strip():
            raise FastPromptError(f"Class name number {index} is empty; every class needs a name.")
    if position not in POSITIONS:
        raise FastPromptError(f"Unknown class position '{position}'; use one of {', '.join(POSITIONS)}.")
    if n_ctx < 1:
        raise FastPromptError(f"n_ctx must be at least 1 (got {n_ctx}).")
    n_words = 0
    if prompt_prefix is not None:
        if position != "end":
            raise FastPromptError(
                f"A template initialisation ('{prompt_prefix}') needs the class name at the end; "
                f"use position 'end' or random initialisation with position '{position}'."
            )
        n_words = len(prompt_prefix.split())
        if n_words > n_ctx:
            raise FastPromptError(
                f"The template prefix '{prompt_prefix}' has {n_words} words but the context holds only {n_ctx} "
                f"vectors; use --n-ctx {n_words} or more, or random initialisation."
            )
    head = " ".join([PLACEHOLDER] * (n_ctx - n_words))
    if prompt_prefix:
        head = f"{head} {prompt_prefix}".strip()
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    rows, slots, eots, prompts = [], [], [], []
    for name in classnames:
        text = f"{head} {name}."
        ids = [sot, *_encode(tokenizer, text), eot]
        if len(ids) > context_length:
            raise FastPromptError(
                f"The prompt for class '{name}' is {len(ids)} tokens long, {len(ids) - context_length} more than the "
                f"model's {context_length}-token context; shorten the class name or use a smaller --n-ctx."
            )
        slot = [-1] * context_length
        if position == "end":
            for j in range(n_ctx):
                slot[1 + j] = j
        else:
            # CoOp: the class tokens are the first name_len tokens after the context; the rest ('.', eot) stays last.
            name_len = len(_encode(tokenizer, name))
            ctx_ids, name_ids, rest = (
                ids[1 : 1 + n_ctx],
                ids[1 + n_ctx : 1 + n_ctx + name_len],
                ids[1 + n_ctx + name_len :],
            )
            if position == "front":
                ids = [sot, *name_ids, *ctx_ids, *rest]
                start = 1 + name_len
                for j in range(n_ctx):
                    slot[start + j] = j
            else:
                half = n_ctx // 2
                ids = [sot, *ctx_ids[:half], *name_ids, *ctx_ids[half:], *rest]
                for j in range(half):
                    slot[1 + j] = j
                for j in range(half, n_ctx):
                    slot[1 + name_len + j] = j
        eots.append(len(ids) - 1)
        rows.append(ids + [0] * (context_length - len(ids)))
        slots.append(slot)
        prompts.append(text)
    return PromptLayout(
        tokens=torch.tensor(rows, dtype=torch.long),
        ctx_slot=torch.tensor(slots, dtype=torch.long),
        eot_index=torch.tensor(eots, dtype=torch.long),
        n_placeholders=n_ctx - n_words,
        prompts=tuple(prompts),
    )


def template_context(token_embedding: torch.nn.Module, layout: PromptLayout, n_ctx: int) -> torch.Tensor:
    """ProGrad's initial context (n_ctx, W): the template's token embeddings, zeros at the placeholder positions.

    Only valid for position "end" (the context occupies positions 1..n_ctx of every prompt).
    """
    with torch.no_grad():
        rows = token_embedding(layout.tokens[0, 1 : 1 + n_ctx].to(token_embedding.weight.device)).float().clone()
    rows[: layout.n_placeholders] = 0.0
    return rows


def random_context(n_ctx: int, width: int, generator: torch.Generator | None = None, std: float = 0.02) -> torch.Tensor:
    """CoOp's initial context (n_ctx, W): normal with standard deviation 0.02."""
    return torch.randn(n_ctx, width, generator=generator) * std
