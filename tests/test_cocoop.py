"""CoCoOp and ProGrad-on-CoCoOp: the batched shared-prefix engine equals the release's trainer written plainly.

The plain trainer below follows the ProGrad release's copy of CoCoOp (trainers/cocoop.py): per image, the full
77-token prompt embeddings [SOT, ctx + meta_net(x), class tokens] through the model's own text transformer, one
cross-entropy over the batch, autograd, torch.optim.SGD over (ctx, meta-net); for prograd_cocoop two gradients of the
same forward pass and ProGrad's projection applied to each parameter tensor in a Python loop.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from fastprompt.kernels.prograd_update import prograd_update_ref
from numerics import assert_close, relative_error, tolerance

from fastprompt.clip import load_clip
from fastprompt.errors import FastPromptError
from fastprompt.templates import prograd_template
from fastprompt.train import cocoop
from fastprompt.train.cocoop import (
    PARAMETER_NAMES,
    CocoopEngine,
    cocoop_encoder,
    init_prefix,
    initial_parameters,
)
from fastprompt.train.config import RunConfig, Schedule, resolve
from fastprompt.train.engine import RunState
from fastprompt.zeroshot import zero_shot_weights

NAMES = ["abyssinian", "basset hound", "great pyrenees", "sphynx", "yorkshire terrier"]
LR, WARMUP_LR = 0.05, 1e-3  # larger than the release's 0.002 / 1e-5 so that a few steps move the tensors visibly


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    clip = load_clip("fastprompt-tiny")
    features = torch.randn(8, 2, 64)  # 8 images, 2 cached views
    labels = torch.arange(8) % len(NAMES)
    return clip, features, labels


def make_config(
    method="cocoop", dataset="DescribableTextures", seed=1, batch_size=2, epochs=4, lam=1.0, init="template"
):
    config = RunConfig(method=method, dataset=dataset, shots=1, seed=seed, lam=lam, n_ctx=4, init=init,
                       epochs=epochs, batch_size=batch_size, lr=LR, warmup_lr=WARMUP_LR)  # fmt: skip
    return resolve(config)


def make_run(config, rows, labels):
    schedule = Schedule(rows.numel(), config.batch_size, config.epochs, config.lr, config.warmup_lr)
    teacher = "single" if config.method == "prograd_cocoop" else None
    return RunState(config, rows, labels, schedule, torch.Generator().manual_seed(config.seed), teacher)


def make_engine(clip, features, runs, dataset="DescribableTextures", **kwargs):
    template = prograd_template(dataset)
    encoder = cocoop_encoder(clip, NAMES, template, n_ctx=4)
    teachers = {"single": zero_shot_weights(clip, NAMES, template)}
    kwargs.setdefault("update_fn", prograd_update_ref)
    return CocoopEngine(encoder, features, runs, teachers, clip.logit_scale, **kwargs)


# ------------------------------------------------------------------------------------------ the plain release
def release_prompt_learner(clip, words: str, seed: int, n_ctx: int = 4):
    """The release's PromptLearner.__init__: template words X-padded, ctx zeros at the X, meta-net under the seed."""
    model = clip.model
    n_words = len(words.split(" "))
    with torch.no_grad():
        embedding = model.token_embedding(clip.tokenizer([words]))
    ctx = torch.zeros(n_ctx, model.token_embedding.weight.shape[1])
    ctx[n_ctx - n_words :] = embedding[0, 1 : 1 + n_words]
    dim = model.text_projection.shape[1]
    torch.manual_seed(seed)
    layers = [("linear1", torch.nn.Linear(dim, dim // 16)), ("relu", torch.nn.ReLU(inplace=True)),
              ("linear2", torch.nn.Linear(dim // 16, ctx.shape[1]))]  # fmt: skip
    meta_net = torch.nn.Sequential(OrderedDict(layers))
    prompt_prefix = " ".join(["X"] * (n_ctx - n_words)) + " " + words
    return torch.nn.Parameter(ctx), meta_net, [f"{prompt_prefix} {name}." for name in NAMES]


def release_training(clip, features, labels, config, teacher, steps):
    """CoCoOp's trainer (ProGrad's rule per parameter for prograd_cocoop) on the cached views, plainly."""
    model = clip.model
    words = init_prefix(prograd_template(config.dataset), config.n_ctx)[0]
    ctx, meta_net, prompts = release_prompt_learner(clip, words, config.seed, config.n_ctx)
    tokens = clip.tokenizer(prompts)
    with torch.no_grad():
        embedded = model.token_embedding(tokens)
    token_prefix, token_suffix = embedded[:, :1], embedded[:, 1 + config.n_ctx :]
    params = [ctx, *meta_net.parameters()]
    optimizer = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)
    images_all = F.normalize(features, dim=-1)
    scale = model.logit_scale.exp()
    generator = torch.Generator().manual_seed(config.seed)  # the data order: a fresh permutation and views per epoch
    n, b, k = labels.numel(), config.batch_size, len(NAMES)
    iterations = n // b if n >= b else 1
    conflicts = []
    for step in range(steps):
        epoch, iteration = divmod(step, iterations)
        if iteration == 0:
            order = torch.randperm(n, generator=generator)
            views = torch.randint(features.shape[1], (n,), generator=generator)
        chosen = order[iteration * b : (iteration + 1) * b]
        images, targets = images_all[chosen, views[chosen]], labels[chosen]
        rate = WARMUP_LR if epoch == 0 else LR / 2 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
        for group in optimizer.param_groups:
            group["lr"] = rate
        logits = []
        for image in images:
            ctx_i = (ctx + meta_net(image)).unsqueeze(0).expand(k, -1, -1)
            x = torch.cat([token_prefix, ctx_i, token_suffix], dim=1) + model.positional_embedding
            x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
            text = x[torch.arange(k), tokens.argmax(dim=-1)] @ model.text_projection
            logits.append(scale * image @ F.normalize(text, dim=-1).T)
        logits = torch.stack(logits)
        loss_ce = F.cross_entropy(logits, targets)
        optimizer.zero_grad()
        if config.method == "cocoop":
            loss_ce.backward()
        else:
            teacher_probs = (scale * images @ teacher.T).softmax(dim=-1)
            loss_kl = -(teacher_probs * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
            g_d = torch.autograd.grad(loss_ce, params, retain_graph=True)
            g_g = torch.autograd.grad(loss_kl, params)
            flags = []
            for param, grad_d, grad_g in zip(params, g_d, g_g, strict=True):
                dot = (grad_d * grad_g).sum()
                flags.append(bool(dot < 0))
                param.grad = grad_d - config.lam * dot / (grad_g * grad_g).sum() * grad_g if dot < 0 else grad_d
            conflicts.append(flags)
        optimizer.step()
    tensors = {"ctx": ctx.detach()} | {f"meta_net.{name}": p.detach() for name, p in meta_net.named_parameters()}
    return tensors, conflicts


def assert_same_training(actual: dict, expected: dict, start: dict, what: str) -> None:
    """Every tensor and every tensor's change from `start` (small after a few steps) within the fp32 tolerance."""
    for name in PARAMETER_NAMES:
        assert_close(actual[name], expected[name], what=f"{what}: {name}")
        assert_close(actual[name] - start[name], expected[name] - start[name], what=f"{what}: change of {name}")


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "dataset,batch_size", [("DescribableTextures", 2), ("OxfordPets", 3)], ids=["x-padded", "fallback"]
)
def test_cocoop_steps_equal_the_release(setup, dataset, batch_size):
    """(a) Eight CoCoOp steps (warm-up and cosine epochs) equal the release's per-image 77-token trainer."""
    clip, features, labels = setup
    config = make_config(dataset=dataset, batch_size=batch_size)
    teacher = zero_shot_weights(clip, NAMES, prograd_template(dataset))
    expected, _ = release_training(clip, features, labels, config, teacher, steps=8)
    run = make_run(config, torch.arange(8), labels)
    engine = make_engine(clip, features, [run], dataset)
    start = engine.trained_tensors(0)
    for _ in range(8):
        engine.step()
    assert engine.collect(0) and run.step == 8
    assert_same_training(engine.trained_tensors(0), expected, start, f"cocoop on {dataset}")
    assert run.totals["seen"] == 8 * batch_size and run.totals["conflicts"] == 0


@pytest.mark.parametrize("lam", [1.0, 0.8])
def test_prograd_cocoop_projects_each_tensor_separately(setup, lam):
    """(b) prograd_cocoop equals the per-parameter projection loop + torch.optim.SGD (and is not CoCoOp)."""
    clip, features, labels = setup
    config = make_config("prograd_cocoop", lam=lam)
    teacher = zero_shot_weights(clip, NAMES, prograd_template(config.dataset))
    expected, conflicts = release_training(clip, features, labels, config, teacher, steps=8)
    mixed = [flags for flags in conflicts if any(flags) and not all(flags)]
    assert mixed, "the test needs steps where some tensors conflict and others do not"
    run = make_run(config, torch.arange(8), labels)
    engine = make_engine(clip, features, [run])
    start = engine.trained_tensors(0)
    for _ in range(8):
        engine.step()
    assert engine.collect(0)
    assert_same_training(engine.trained_tensors(0), expected, start, f"prograd_cocoop lambda {lam}")
    fraction = sum(sum(flags) / len(flags) for flags in conflicts)  # logged: mean over the five tensors per step
    assert run.totals["conflicts"] == pytest.approx(fraction)
    plain, _ = release_training(clip, features, labels, make_config("cocoop"), teacher, steps=8)
    change = relative_error(engine.trained_tensors(0)["ctx"] - start["ctx"], plain["ctx"] - start["ctx"])
    assert change > 100 * tolerance(torch.float32), "the projection should change the result"


def test_batched_runs_equal_each_run_alone(setup):
    """(c) Runs of different methods, seeds, subsets and batch sizes in one engine equal each run trained alone."""
    clip, features, labels = setup
    subsets = [torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1, 3, 5, 7, 6, 2]), torch.tensor([7, 0, 4])]
    configs = [make_config("cocoop", seed=1, batch_size=2), make_config("prograd_cocoop", seed=2, batch_size=3),
               make_config("prograd_cocoop", seed=3, batch_size=1, lam=0.8)]  # fmt: skip

    def fresh_runs():
        return [make_run(c, rows, labels[rows]) for c, rows in zip(configs, subsets, strict=True)]

    batched_runs = fresh_runs()
    batched = make_engine(clip, features, batched_runs)
    for _ in range(5):
        batched.step()
    for index, (run, alone_run) in enumerate(zip(batched_runs, fresh_runs(), strict=True)):
        alone = make_engine(clip, features, [alone_run])
        start = alone.trained_tensors(0)
        for _ in range(5):
            alone.step()
        assert batched.collect(index) and alone.collect(0)
        assert_same_training(batched.trained_tensors(index), alone.trained_tensors(0), start, f"run {index}")
        for key in ("loss", "correct", "seen", "cos", "conflicts"):
            assert run.totals[key] == pytest.approx(alone_run.totals[key], rel=1e-5, abs=1e-6), key


def test_checkpoint_restore_continues_identically(setup):
    """(d) Two runs checkpointed after 3 steps and restored into a new engine continue exactly as without the stop."""
    clip, features, labels = setup
    configs = [make_config("prograd_cocoop", seed=1), make_config("cocoop", seed=2, batch_size=3)]
    rows = torch.arange(8)
    straight_runs = [make_run(c, rows, labels) for c in configs]
    straight = make_engine(clip, features, straight_runs)
    first_runs = [make_run(c, rows, labels) for c in configs]
    first = make_engine(clip, features, first_runs)
    for _ in range(3):
        first.step()
    saved = [{"run": run.state_dict(), **first.checkpoint(i)} for i, run in enumerate(first_runs)]
    resumed_runs = [make_run(c, rows, labels) for c in configs]
    resumed = make_engine(clip, features, resumed_runs, initial=[first.trained_tensors(1), first.trained_tensors(0)])
    for index, (run, state) in enumerate(zip(resumed_runs, saved, strict=True)):
        run.load_state_dict(state["run"])
        resumed.restore(index, state)
    for _ in range(6):
        straight.step()
    for _ in range(3):
        resumed.step()
    for index in range(2):
        assert straight.collect(index) and resumed.collect(index)
        assert torch.equal(resumed.params, straight.params) and torch.equal(resumed.momentum_buf, straight.momentum_buf)
        assert resumed_runs[index].totals == straight_runs[index].totals


def test_init_fallback_rule(setup):
    """(e) Template words X-padded as the release does; CoOp's "a photo of a" where the template is too long (recorded
    as init_fallback); meta-net as nn.Linear initialises it under the run's seed; the rule's errors."""
    clip, features, labels = setup
    assert init_prefix("a texture of {}.", 4) == ("a texture of", False)
    assert init_prefix("a type of pet, a photo of a {}.", 4) == ("a photo of a", True)
    assert init_prefix("a type of pet, a photo of a {}.", 16) == ("a type of pet, a photo of a", False)
    assert init_prefix("a centered satellite photo of {}.", 4) == ("a photo of a", True)
    with pytest.raises(FastPromptError, match="n_ctx = 3"):
        init_prefix("a centered satellite photo of {}.", 3)
    for dataset, fallback in (("DescribableTextures", False), ("OxfordPets", True)):
        config = make_config(dataset=dataset, seed=7)
        engine = make_engine(clip, features, [make_run(config, torch.arange(8), labels)], dataset)
        words = init_prefix(prograd_template(dataset), 4)[0]
        assert engine.metrics(0) == {"init_prefix": words, "init_fallback": fallback}
        ctx, meta_net, _ = release_prompt_learner(clip, words, seed=7)
        expected = {"ctx": ctx.detach()} | {f"meta_net.{n}": p.detach() for n, p in meta_net.named_parameters()}
        actual = engine.trained_tensors(0)
        for name in PARAMETER_NAMES:
            assert torch.equal(actual[name], expected[name]), f"{dataset}: initial {name}"
    assert (engine.trained_tensors(0)["ctx"] != 0).all(), "the fallback fills all four vectors"
    wrong = cocoop_encoder(clip, NAMES, "a texture of {}.", n_ctx=4)
    with pytest.raises(FastPromptError, match="cocoop_encoder"):
        CocoopEngine(wrong, features, [make_run(make_config(dataset="OxfordPets"), torch.arange(8), labels)], {}, 100.0)
    coop_config = resolve(RunConfig(method="coop", dataset="DescribableTextures", n_ctx=4, batch_size=2, epochs=1))
    coop = make_run(coop_config, torch.arange(8), labels)
    with pytest.raises(FastPromptError, match="LockstepEngine"):
        make_engine(clip, features, [coop])
    random_init = initial_parameters(wrong, make_config(init="random", seed=7), 64)
    torch.manual_seed(7)
    expected_ctx = torch.nn.init.normal_(torch.empty(4, 64), std=0.02)  # the release's random init, then the meta-net
    expected_w1 = torch.nn.Linear(64, 4).weight
    assert torch.equal(random_init["ctx"], expected_ctx)
    assert torch.equal(random_init["meta_net.linear1.weight"], expected_w1)


@pytest.mark.parametrize("new_classes", [False, True], ids=["training_classes", "new_classes"])
def test_evaluate_equals_plain_per_image_prompts(setup, monkeypatch, new_classes):
    """Every test image classified with its own context through the 77-token path, for the training classes or
    (base-to-new) other class names with the same words; chunking images and classes does not matter."""
    clip, features, labels = setup
    run = make_run(make_config("prograd_cocoop"), torch.arange(8), labels)
    engine = make_engine(clip, features, [run])
    for _ in range(4):
        engine.step()
    names = ["bombay", "english setter", "pug", "samoyed", "saint bernard", "beagle"] if new_classes else NAMES
    encoder = cocoop_encoder(clip, names, prograd_template("DescribableTextures")) if new_classes else None
    test = F.normalize(torch.randn(9, 64), dim=-1)
    test_labels = torch.arange(9) % len(names)
    tensors = engine.trained_tensors(0)
    plain = []
    for image in test:
        hidden = torch.relu(image @ tensors["meta_net.linear1.weight"].T + tensors["meta_net.linear1.bias"])
        bias = hidden @ tensors["meta_net.linear2.weight"].T + tensors["meta_net.linear2.bias"]
        with torch.no_grad():
            text = (encoder or engine.encoder).reference((tensors["ctx"] + bias)[None])[0]
        plain.append((image @ F.normalize(text, dim=-1).T).argmax())
    plain = torch.stack(plain)
    accuracy, per_class, predictions = engine.evaluate(0, test, test_labels, encoder=encoder)
    assert torch.equal(predictions, plain)
    assert accuracy == pytest.approx(100.0 * float((plain == test_labels).float().mean()))
    assert len(per_class) == len(names)
    monkeypatch.setattr(cocoop, "EVAL_TOKEN_ROWS", 1)  # one image per chunk
    engine.class_chunk = 2
    assert torch.equal(engine.evaluate(0, test, test_labels, encoder=encoder)[2], plain)


def test_class_chunks_equal_all_classes(setup):
    """The memory-bounded path (no-grad pass, then recomputed chunks of classes) equals the all-classes step."""
    clip, features, labels = setup
    results = []
    for chunk in (None, 2):
        run = make_run(make_config("prograd_cocoop", batch_size=3), torch.arange(8), labels)
        engine = make_engine(clip, features, [run], class_chunk=chunk)
        start = engine.trained_tensors(0)
        for _ in range(4):
            engine.step()
        results.append(engine.trained_tensors(0))
    for name in PARAMETER_NAMES:
        assert_close(results[1][name] - start[name], results[0][name] - start[name], what=f"chunked {name}")


def test_divergence_freezes_only_that_run(setup):
    """A run whose image features are NaN fails at collect with its tensors from before the bad step; the other run
    of the group trains as if alone."""
    clip, features, labels = setup
    poisoned = torch.cat([features, torch.full_like(features, float("nan"))])
    configs = [make_config("prograd_cocoop", seed=1), make_config("cocoop", seed=2)]
    runs = [make_run(configs[0], torch.arange(8), labels), make_run(configs[1], torch.arange(8, 16), labels)]
    engine = make_engine(clip, poisoned, runs)
    start = engine.trained_tensors(1)
    for _ in range(3):
        engine.step()
    assert engine.collect(0) and not engine.collect(1)
    assert runs[1].status == "failed" and runs[1].divergence["step"] == 1
    for name in PARAMETER_NAMES:
        assert torch.equal(engine.trained_tensors(1)[name], start[name])
    alone_run = make_run(configs[0], torch.arange(8), labels)
    alone = make_engine(clip, features, [alone_run])
    for _ in range(3):
        alone.step()
    for name in PARAMETER_NAMES:
        assert_close(engine.trained_tensors(0)[name], alone.trained_tensors(0)[name], what=name)


def test_saved_activations_per_image_are_prefix_and_suffixes(setup):
    """What one step keeps for its backward grows with the images, by about each image's prefix and K suffixes: far
    below the K x 77 token rows per image of the plain path, at any batch size."""
    clip, features, labels = setup
    weights = {t.untyped_storage().data_ptr() for t in [*clip.model.parameters(), *clip.model.buffers()]}

    def kept_bytes(fn) -> int:
        kept: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn()
        return sum(kept.values())

    per_image = {}
    for batch_size in (1, 4):
        engine = make_engine(clip, features, [make_run(make_config(batch_size=batch_size), torch.arange(8), labels)])
        per_image[batch_size] = kept_bytes(engine.step) / batch_size
    context = engine.trained_tensors(0)["ctx"][None].requires_grad_(True)
    plain = kept_bytes(lambda: engine.encoder.reference(context))  # one image's K prompts of 77 tokens
    assert per_image[4] <= 1.05 * per_image[1], per_image
    assert per_image[4] < 0.25 * plain, (per_image, plain)
