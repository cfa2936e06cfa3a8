"""The engine's step equals PROTOCOL.md's step written plainly: 77-token open_clip path, two backward passes,
per-tensor projection, torch.optim.SGD and the per-epoch schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fastprompt.kernels.prograd_update import prograd_update_ref
from numerics import assert_close, relative_error, tolerance

from fastprompt.clip import load_clip
from fastprompt.encoder import PromptEncoder
from fastprompt.train.config import RunConfig, Schedule, resolve
from fastprompt.train.engine import LockstepEngine, RunState
from fastprompt.zeroshot import zero_shot_weights

NAMES = ["abyssinian", "basset hound", "great pyrenees", "sphynx", "yorkshire terrier"]
TEMPLATE = "a type of pet, a photo of a {}."
PREFIX = "a type of pet, a photo of a"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    clip = load_clip("fastprompt-tiny")
    features = torch.randn(10, 1, 64)  # 10 images, one view, all in one batch (N < 32)
    labels = torch.arange(10) % len(NAMES)
    teacher = zero_shot_weights(clip, NAMES, TEMPLATE)
    return clip, features, labels, teacher


def reference_training(clip, features, labels, teacher, method, steps, epochs, lam=1.0, alpha=1.0, init="template"):
    """PROTOCOL.md written plainly: the model's own 77-token transformer, two backward passes, torch.optim.SGD."""
    model = clip.model
    prefix = None if init == "random" else PREFIX
    head = ("X " * (16 - len(PREFIX.split())) + PREFIX) if prefix else "X " * 16
    prompts = [f"{head.strip()} {name}." for name in NAMES]
    tokens = clip.tokenizer(prompts)
    with torch.no_grad():
        embedded = model.token_embedding(tokens)
    if init == "template":
        start = embedded[0, 1:17].clone()
        start[: 16 - len(PREFIX.split())] = 0.0
    else:
        start = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    ctx = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.SGD([ctx], lr=1e-5, momentum=0.9, weight_decay=5e-4)
    images = F.normalize(features[:, 0], dim=-1)
    scale = model.logit_scale.exp()
    for step in range(steps):
        epoch = step  # one iteration per epoch (N < 32)
        lr = 1e-5 if epoch == 0 else 0.001 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = torch.cat([embedded[:, :1], ctx.expand(len(NAMES), -1, -1), embedded[:, 17:]], dim=1)
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        x = model.ln_final(x)[torch.arange(len(NAMES)), tokens.argmax(dim=-1)] @ model.text_projection
        logits = scale * images @ F.normalize(x, dim=-1).T
        loss_ce = F.cross_entropy(logits, labels)
        teacher_probs = (scale * images @ teacher.T).softmax(dim=-1)
        loss_kl = -(teacher_probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
        optimizer.zero_grad()
        if method == "coop":
            (grad,) = torch.autograd.grad(loss_ce, ctx)
        elif method == "kd":
            (grad,) = torch.autograd.grad(loss_ce + alpha * loss_kl, ctx)
        else:
            (g_d,) = torch.autograd.grad(loss_ce, ctx, retain_graph=True)
            (g_g,) = torch.autograd.grad(loss_kl, ctx)
            dot = (g_d * g_g).sum()
            grad = g_d - lam * dot / (g_g * g_g).sum() * g_g if dot < 0 else g_d
        ctx.grad = grad
        optimizer.step()
    return ctx.detach()


def engine_training(clip, features, labels, teacher, method, steps, epochs, lam=1.0, alpha=1.0, init="template"):
    config = resolve(
        RunConfig(method=method, dataset="OxfordPets", shots=2, seed=1, lam=lam, alpha=alpha, epochs=epochs, init=init)
    )
    encoder = PromptEncoder(clip, NAMES, n_ctx=16, prompt_prefix=PREFIX if init == "template" else None)
    if init == "template":
        start = encoder.initial_context("template")
    else:
        start = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    schedule = Schedule(len(labels), config.batch_size, config.epochs, config.lr, config.warmup_lr)
    run = RunState(
        config,
        torch.arange(len(labels)),
        labels,
        schedule,
        torch.Generator().manual_seed(1),
        teacher=None if method == "coop" else "zs",
    )
    engine = LockstepEngine(
        encoder, features, [run], start[None], {"zs": teacher}, clip.logit_scale, update_fn=prograd_update_ref
    )
    for _ in range(steps):
        engine.step()
    assert engine.collect(0), "the run diverged"
    return engine.context(0).clone(), run


@pytest.mark.parametrize("method,lam", [("prograd", 1.0), ("prograd", 0.8), ("coop", 1.0), ("kd", 1.0)])
def test_twenty_steps_equal_plain_protocol(setup, method, lam):
    clip, features, labels, teacher = setup
    init = "random" if method == "coop" else "template"
    expected = reference_training(clip, features, labels, teacher, method, 20, 20, lam=lam, alpha=2.0, init=init)
    actual, run = engine_training(clip, features, labels, teacher, method, 20, 20, lam=lam, alpha=2.0, init=init)
    assert run.step == 20 and run.status == "running"
    assert_close(actual, expected, what=f"{method} context after 20 steps")
    if method == "prograd":
        assert run.totals["conflicts"] > 0, "the test should exercise the projection"


def test_lambda_zero_is_coop_on_same_prompt(setup):
    """ProGrad with lambda 0 keeps G_d even where the gradients conflict: it is the engine's CoOp (cross-entropy only)
    on the same template-initialised prompt, and the plain CE-only trainer; lambda 1 on the same data is not."""
    clip, features, labels, teacher = setup
    prograd, run = engine_training(clip, features, labels, teacher, "prograd", 10, 20, lam=0.0)
    coop, coop_run = engine_training(clip, features, labels, teacher, "coop", 10, 20, init="template")
    assert coop_run.config.method == "coop" and coop_run.config.init == "template" and coop_run.teacher is None
    assert run.totals["conflicts"] > 0, "lambda 0 only matters where the gradients conflict"
    assert_close(prograd, coop, what="ProGrad lambda 0 vs the engine's CoOp on the template prompt")
    expected = reference_training(clip, features, labels, teacher, "coop", 10, 20, init="template")
    assert_close(prograd, expected, what="ProGrad lambda 0 vs plain CE-only training")
    projected, _ = engine_training(clip, features, labels, teacher, "prograd", 10, 20, lam=1.0)
    assert relative_error(projected, coop) > 100 * tolerance(torch.float32), "the projection should change the result"
