"""The cached-feature heads against plain implementations written here: closed forms exactly, the trained heads for a
few epochs against plain torch.optim loops with plain autograd, the ProGrad projection per tensor, the searches on the
validation split only, and bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close

from fastprompt.errors import FastPromptError
from fastprompt.heads import HEADS, HeadTask
from fastprompt.heads.tip_adapter import INIT_ALPHA_BETA, SEARCH_SCALES, tip_logits
from fastprompt.train.config import RunConfig

NAMES = {
    "tip_adapter", "tip_adapter_f", "tip_adapter_f+prograd", "gda", "clap", "clap+prograd", "cosine",
    "cosine+prograd", "linear_sgd", "linear_sgd+prograd",
}  # fmt: skip


def make_task(
    method: str,
    *,
    classes: int = 5,
    dim: int = 32,
    shots: int = 4,
    views: int = 12,
    val_per_class: int = 3,
    test_per_class: int = 8,
    seed: int = 0,
    **config,
) -> HeadTask:
    """A small random problem: class centres plus noise large enough that no head gets everything right."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen)

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(classes).repeat_interleave(per_class)
        return 3.0 * (centres[labels] + 1.5 * torch.randn(labels.numel(), dim, generator=gen)), labels

    train_labels = torch.arange(classes).repeat_interleave(shots)
    train_views = 3.0 * (
        centres[train_labels][:, None] + 1.5 * torch.randn(train_labels.numel(), views, dim, generator=gen)
    )
    val_features, val_labels = draw(val_per_class)
    test_features, test_labels = draw(test_per_class)
    text = F.normalize(centres + 1.5 * torch.randn(classes, dim, generator=gen), dim=-1)
    settings = {**HEADS[method].defaults, "lam": 1.0, "epochs": 2, **config}
    run = RunConfig(method=method, dataset=config.pop("dataset", "OxfordPets"), shots=shots, seed=1)
    run = dataclasses.replace(run, **{k: v for k, v in settings.items() if k != "dataset"})
    return HeadTask(
        train_views=train_views,
        train_center=train_views[:, 0].clone(),
        train_labels=train_labels,
        val_features=val_features,
        val_labels=val_labels,
        test_features=test_features,
        test_labels=test_labels,
        text_weights=text,
        logit_scale=100.0,
        config=run,
        generator=torch.Generator().manual_seed(run.seed),
    )


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def plain_project(g_d: torch.Tensor, g_g: torch.Tensor, lam: float) -> torch.Tensor:
    """ProGrad's rule for one tensor, as the paper's code writes it (plus "no conflict" when G_g is zero)."""
    dot = (g_d * g_g).sum()
    if dot < 0 and g_g.square().sum() > 0:
        return g_d - lam * dot / g_g.square().sum() * g_g
    return g_d


def plain_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(p_teacher || p_student) (its gradient equals the soft cross-entropy's)."""
    p = teacher.softmax(dim=-1)
    return (p * (p.log() - student.log_softmax(dim=-1))).sum(dim=-1).mean()


def plain_kl_gradient(logits: torch.Tensor, teacher: torch.Tensor, params) -> tuple[torch.Tensor, ...]:
    """Gradient of the batch-mean KL(p_teacher || p_student) with respect to params, from the KL's logit gradient
    (P - P_teacher) / B: exactly zero where the student's logits equal the teacher's (autograd through the KL's log
    terms leaves rounding noise there instead)."""
    cotangent = (logits.softmax(-1) - teacher.softmax(-1)) / logits.shape[0]
    return torch.autograd.grad(logits, params, cotangent, retain_graph=True)


def test_the_kl_logit_gradient_is_the_kl_gradient():
    student, teacher = torch.randn(6, 5, requires_grad=True), 3 * torch.randn(6, 5)
    (expected,) = torch.autograd.grad(plain_kl(student, teacher), student)
    assert_close(plain_kl_gradient(student * 1.0, teacher, [student])[0], expected)


# --------------------------------------------------------------------------------------------------- registry
def test_registry_names_defaults_and_flags():
    assert set(HEADS) == NAMES
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for name, spec in HEADS.items():
        assert set(spec.defaults) <= fields, name
        assert spec.prograd == name.endswith("+prograd")
        assert spec.source
        if spec.prograd:
            assert spec.trained and HEADS[name.removesuffix("+prograd")].defaults == spec.defaults
    assert HEADS["tip_adapter_f"].defaults_for("EuroSAT")["epochs"] == 100  # configs/eurosat.yaml: train_epoch 100
    assert HEADS["tip_adapter_f"].defaults_for("OxfordPets")["epochs"] == 20


def test_soft_cross_entropy_matches_the_prompt_trainer():
    from fastprompt.heads.common import soft_cross_entropy
    from fastprompt.train.engine import _soft_ce_per_run

    student, teacher = torch.randn(7, 5), 10 * torch.randn(7, 5)
    expected = _soft_ce_per_run(student[None], teacher[None], torch.ones(1)).mean()
    assert_close(soft_cross_entropy(student, teacher), expected)


def test_project_is_the_per_tensor_rule_on_every_segment():
    """common.project (the kernel at lr 0) against the rule written plainly, segment by segment: a conflicting
    segment, an agreeing one, one whose G_g is zero and a conflicting one of odd length."""
    from fastprompt.heads.common import project

    lengths = [6, 5, 4, 7]
    g_d, g_g = torch.randn(sum(lengths)), torch.randn(sum(lengths))
    pieces_d, pieces_g = list(g_d.split(lengths)), list(g_g.split(lengths))
    pieces_g[0] = -pieces_d[0] + 0.3 * torch.randn(6)  # conflict
    pieces_g[1] = pieces_d[1] + 0.3 * torch.randn(5)  # agreement
    pieces_g[2] = torch.zeros(4)  # no teacher gradient
    pieces_g[3] = -2.0 * pieces_d[3] + torch.randn(7)  # conflict
    g_g = torch.cat(pieces_g)
    offsets = torch.tensor([0, 6, 11, 15, 22])
    projected, stats = project(g_d, g_g, offsets, 0.8)
    expected = torch.cat([plain_project(d, g, 0.8) for d, g in zip(pieces_d, pieces_g, strict=True)])
    assert_close(projected, expected, what="projected gradient")
    assert stats.conflict.tolist() == [True, False, False, True]


# ------------------------------------------------------------------------------------------------ Tip-Adapter
def plain_search(task: HeadTask, keys: torch.Tensor) -> tuple[float, float]:
    """The release's search_hp, loop for loop (configs/oxford_pets.yaml: search_scale [7, 3], steps 200 and 20)."""
    scale = (7, 3)
    beta_list = [i * (scale[0] - 0.1) / 200 + 0.1 for i in range(200)]
    alpha_list = [i * (scale[1] - 0.1) / 20 + 0.1 for i in range(20)]
    features = normalise(task.val_features)
    values = F.one_hot(task.train_labels, task.num_classes).float()
    best_acc, best_beta, best_alpha = 0, 0, 0
    affinity = features @ keys.T
    clip_logits = 100.0 * features @ task.text_weights.T
    for beta in beta_list:
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
        for alpha in alpha_list:
            acc = (
                100
                * float((clip_logits + cache_logits * alpha).argmax(1).eq(task.val_labels).float().sum())
                / len(task.val_labels)
            )
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_alpha, best_beta


def test_tip_adapter_logits_search_and_test_predictions_match_the_release():
    task = make_task("tip_adapter", views=12)
    keys = normalise(task.train_views[:, :10].mean(dim=1))  # the release averages 10 augmented passes
    values = F.one_hot(task.train_labels, task.num_classes).float()
    test = normalise(task.test_features)
    alpha, beta = 1.7, 3.2
    expected = 100.0 * test @ task.text_weights.T + alpha * ((-1) * (beta - beta * test @ keys.T)).exp() @ values
    assert_close(tip_logits(test, keys, task.train_labels, task, alpha, beta), expected, what="Tip-Adapter logits")

    result = HEADS["tip_adapter"].fit(task)
    assert_close(result.state["cache_keys"], keys, what="cache keys")
    best_alpha, best_beta = plain_search(task, keys)
    assert (result.metrics["alpha"], result.metrics["beta"]) == pytest.approx((best_alpha, best_beta), rel=1e-12)
    assert result.metrics["search_split"] == "val"
    chosen = (
        100.0 * test @ task.text_weights.T
        + best_alpha * ((-1) * (best_beta - best_beta * test @ keys.T)).exp() @ values
    )
    assert torch.equal(result.predictions, chosen.argmax(dim=1))
    assert result.accuracy == pytest.approx(100.0 * float((chosen.argmax(1) == task.test_labels).float().mean()))
    assert 0 < result.accuracy < 100  # the problem is neither trivial nor hopeless


def test_search_grid_is_the_release_config_per_dataset():
    task = make_task("tip_adapter", dataset="FGVCAircraft")
    assert SEARCH_SCALES["FGVCAircraft"] == (30.0, 30.0) and INIT_ALPHA_BETA["FGVCAircraft"] == (5.0, 1.0)
    from fastprompt.heads.tip_adapter import search_grid

    betas, alphas = search_grid(task.config.dataset)
    assert len(betas) == 200 and len(alphas) == 20
    assert betas[0] == 0.1 and betas[-1] == pytest.approx(199 * 29.9 / 200 + 0.1)
    assert alphas[-1] == pytest.approx(19 * 29.9 / 20 + 0.1)


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f", "gda"])
def test_searches_never_read_the_test_split(method):
    """Corrupting the test labels and features must not change what the search on val chooses."""
    task = make_task(method, epochs=2, batch_size=8)
    result = HEADS[method].fit(task)
    corrupted = dataclasses.replace(
        make_task(method, epochs=2, batch_size=8),
        test_labels=torch.flip(task.test_labels, [0]),
        test_features=-task.test_features[:3],
    )
    corrupted.test_labels = corrupted.test_labels[:3]
    other = HEADS[method].fit(corrupted)
    keys = ("alpha", "beta", "best_epoch", "val_accuracy")
    assert {k: result.metrics.get(k) for k in keys} == {k: other.metrics.get(k) for k in keys}
    for name, tensor in result.state.items():
        assert torch.equal(tensor, other.state[name]), name


def test_faiss_lookup_gives_the_dense_logits():
    from fastprompt.heads.tip_adapter import fit_tip_adapter

    task = make_task("tip_adapter")
    dense = fit_tip_adapter(task, lookup="dense")
    faiss = fit_tip_adapter(make_task("tip_adapter"), lookup="faiss")
    assert faiss.metrics["lookup"] == "faiss"
    assert torch.equal(dense.predictions, faiss.predictions)
    keys, test = dense.state["cache_keys"], normalise(task.test_features)
    args = (keys, task.train_labels, task, dense.metrics["alpha"], dense.metrics["beta"])
    assert_close(tip_logits(test, *args, lookup="faiss"), tip_logits(test, *args, lookup="dense"), what="faiss")
    with pytest.raises(FastPromptError):
        fit_tip_adapter(task, lookup="annoy")


def plain_tip_adapter_f(task: HeadTask, prograd: bool) -> tuple[torch.Tensor, list[float]]:
    """Tip-Adapter-F's training loop (release main.py) on one cached view per image and epoch; epoch picked on val."""
    config = task.config
    gen = torch.Generator().manual_seed(config.seed)
    alpha, beta = 1.17, 1.0  # configs/oxford_pets.yaml
    keys = torch.nn.Parameter(normalise(task.train_views[:, :10].mean(dim=1)))
    values = F.one_hot(task.train_labels, task.num_classes).float()
    optimizer = torch.optim.AdamW([keys], lr=config.lr, eps=1e-4, weight_decay=config.weight_decay)
    n, num_views = task.train_views.shape[:2]
    steps_per_epoch = math.ceil(n / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    val = normalise(task.val_features)
    best_acc, best_keys, losses = -1.0, None, []
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        views = torch.randint(num_views, (n,), generator=gen)
        for start in range(0, n, config.batch_size):
            items = order[start : start + config.batch_size]
            features = normalise(task.train_views[items, views[items]])
            clip_logits = 100.0 * features @ task.text_weights.T
            logits = clip_logits + alpha * ((-1) * (beta - beta * features @ keys.T)).exp() @ values
            loss = F.cross_entropy(logits, task.train_labels[items])
            optimizer.zero_grad()
            if prograd:
                g_d = torch.autograd.grad(loss, keys, retain_graph=True)[0]
                g_g = torch.autograd.grad(plain_kl(logits, clip_logits), keys)[0]
                keys.grad = plain_project(g_d, g_g, config.lam)
            else:
                loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            val_logits = (
                100.0 * val @ task.text_weights.T + alpha * ((-1) * (beta - beta * val @ keys.T)).exp() @ values
            )
            acc = float((val_logits.argmax(1) == task.val_labels).float().mean())
        if acc > best_acc:
            best_acc, best_keys = acc, keys.detach().clone()
    return best_keys, losses


@pytest.mark.parametrize("prograd", [False, True])
def test_tip_adapter_f_matches_a_plain_adamw_loop(prograd):
    method = "tip_adapter_f+prograd" if prograd else "tip_adapter_f"
    # A higher rate than the release's so that a few steps move the keys measurably; batch 8 of 20 images: a short
    # last batch (the release does not drop it).
    task = make_task(method, epochs=3, batch_size=8, lr=0.05)
    result = HEADS[method].fit(task)
    keys, losses = plain_tip_adapter_f(make_task(method, epochs=3, batch_size=8, lr=0.05), prograd)
    initial = normalise(task.train_views[:, :10].mean(dim=1))
    assert (keys - initial).abs().max() > 1e-3  # training moved the keys
    assert_close(result.state["cache_keys"], keys, what="trained keys")
    epoch_loss = [sum(losses[i * 3 : (i + 1) * 3]) / 3 for i in range(3)]
    assert_close(torch.tensor([r["loss"] for r in result.log]), torch.tensor(epoch_loss), what="epoch losses")
    if prograd:
        assert all(0.0 <= r["conflict_fraction"] <= 1.0 and -1.0 <= r["cos_mean"] <= 1.0 for r in result.log)


# -------------------------------------------------------------------------------------------------------- GDA
def test_gda_classifier_matches_numpy_and_the_blend_search():
    task = make_task("gda", views=12)
    result = HEADS["gda"].fit(task)
    x = normalise(task.train_views[:, :10]).reshape(-1, task.train_views.shape[-1]).double().numpy()
    y = task.train_labels.repeat_interleave(10).numpy()
    k, d = task.num_classes, x.shape[1]
    mus = np.stack([x[y == c].mean(axis=0) for c in range(k)])
    centred = np.concatenate([x[y == c] - mus[c] for c in range(k)])
    cov = np.cov(centred.T)  # the release's center_vecs.T.cov()
    cov_inv = d * np.linalg.pinv((centred.shape[0] - 1) * cov + np.trace(cov) * np.eye(d))
    weight = mus @ cov_inv
    bias = np.log(1.0 / k) - 0.5 * np.einsum("nd,dc,nc->n", mus, cov_inv, mus)
    assert_close(result.state["weight"], torch.from_numpy(weight), what="GDA weight")
    assert_close(result.state["bias"], torch.from_numpy(bias), what="GDA bias")

    val = normalise(task.val_features).double().numpy()
    zs = 100.0 * val @ task.text_weights.double().numpy().T
    best_acc, best_alpha = 0, 0.1
    for alpha in [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]:
        acc = ((zs + alpha * (val @ weight.T + bias)).argmax(1) == task.val_labels.numpy()).mean()
        if acc > best_acc:
            best_acc, best_alpha = acc, alpha
    assert result.metrics["alpha"] == best_alpha
    test = normalise(task.test_features).double().numpy()
    logits = 100.0 * test @ task.text_weights.double().numpy().T + best_alpha * (test @ weight.T + bias)
    assert np.array_equal(result.predictions.numpy(), logits.argmax(1))


def test_gda_is_sklearn_lda_with_its_shrinkage():
    """With alpha large the blend is GDA alone: the same decisions as an LDA with the release's shrunk covariance."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    task = make_task("gda", views=10, dim=16)
    result = HEADS["gda"].fit(task)
    x = normalise(task.train_views).reshape(-1, 16).double().numpy()
    y = task.train_labels.repeat_interleave(10).numpy()
    centred = x - np.stack([x[y == c].mean(0) for c in range(task.num_classes)])[y]
    n = x.shape[0]
    # LDA's covariance estimate with the release's shrinkage: (S + tr(S)/(n-1) I) / D, as a fixed covariance.
    scatter = centred.T @ centred
    lda = LinearDiscriminantAnalysis(solver="lsqr", priors=np.full(task.num_classes, 1 / task.num_classes))
    lda.fit(x, y)
    lda.covariance_ = (scatter + np.trace(scatter) / (n - 1) * np.eye(16)) / 16
    lda.coef_ = np.linalg.solve(lda.covariance_, lda.means_.T).T
    lda.intercept_ = -0.5 * np.diag(lda.means_ @ lda.coef_.T) + np.log(lda.priors_)
    test = normalise(task.test_features).double().numpy()
    ours = test @ result.state["weight"].double().numpy().T + result.state["bias"].double().numpy()
    assert np.array_equal(ours.argmax(1), lda.predict(test))


# ------------------------------------------------------------------------------------------------------- CLAP
def plain_clap(task: HeadTask, prograd: bool) -> torch.Tensor:
    """The release's CLAP training (ZS init, l2 constraint) with torch.optim.SGD and the Dassl per-epoch schedule."""
    config = task.config
    gen = torch.Generator().manual_seed(config.seed)
    n, num_views, dim = task.train_views.shape
    x = normalise(task.train_views).reshape(-1, dim)
    y = task.train_labels.repeat_interleave(num_views)
    base = task.text_weights.clone()
    zs = 100.0 * x @ normalise(base).T
    probs = zs.softmax(-1)
    multipliers = torch.stack([probs[y == c, c].mean() for c in range(task.num_classes)])
    prototypes = torch.nn.Parameter(base.clone())
    optimizer = torch.optim.SGD([prototypes], lr=config.lr, momentum=0.9, weight_decay=0.0)
    batches = n // config.batch_size if n >= config.batch_size else 1
    for epoch in range(config.epochs):
        rate = (
            config.warmup_lr if epoch == 0 else 0.5 * config.lr * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
        )
        optimizer.param_groups[0]["lr"] = rate
        order = torch.randperm(x.shape[0], generator=gen)
        for b in range(batches):
            rows = order[b * config.batch_size : (b + 1) * config.batch_size]
            logits = 100.0 * x[rows] @ normalise(prototypes).T
            loss = F.cross_entropy(logits, y[rows]) + torch.mean(multipliers * (prototypes - base).pow(2).sum(-1))
            optimizer.zero_grad()
            if prograd:  # the teacher: the zero-shot logits by the same expression as the student's at its start
                g_d = torch.autograd.grad(loss, prototypes, retain_graph=True)[0]
                g_g = plain_kl_gradient(logits, 100.0 * x[rows] @ normalise(base).T, [prototypes])[0]
                prototypes.grad = plain_project(g_d, g_g, config.lam)
            else:
                loss.backward()
            optimizer.step()
    return prototypes.detach()


@pytest.mark.parametrize("prograd", [False, True])
def test_clap_matches_a_plain_sgd_loop(prograd):
    method = "clap+prograd" if prograd else "clap"
    # 20 images < batch 256: one batch per epoch, as the release's image loader; batch 16 gives 1 batch of 16 too.
    for batch_size in (256, 16):
        task = make_task(method, epochs=3, batch_size=batch_size, views=4)
        result = HEADS[method].fit(task)
        expected = plain_clap(make_task(method, epochs=3, batch_size=batch_size, views=4), prograd)
        assert (expected - task.text_weights).abs().max() > 1e-3
        assert_close(result.state["prototypes"], expected, what=f"CLAP prototypes, batch {batch_size}")
        test_logits = normalise(task.test_features) @ normalise(expected).T
        assert torch.equal(result.predictions, test_logits.argmax(1))


def test_clap_multipliers_are_zero_shot_class_accuracy_in_probability():
    from fastprompt.heads.clap import class_multipliers

    logits, labels = 5 * torch.randn(40, 4), torch.arange(4).repeat(10)
    expected = torch.stack([logits[labels == c].softmax(-1)[:, c].mean() for c in range(4)])
    assert_close(class_multipliers(logits, labels, 4), expected)


# ------------------------------------------------------------------------------------- cosine and linear probe
def plain_coop_loop(task: HeadTask, tensors: dict[str, torch.Tensor], logits_fn, prograd: bool, teacher_fn) -> dict:
    """torch.optim.SGD on the CoOp schedule and sampler; with ProGrad, each tensor projected on its own. The batches
    come from ``task.generator`` (after whatever the initialisation drew from it)."""
    config = task.config
    gen = task.generator
    params = {name: torch.nn.Parameter(value.clone()) for name, value in tensors.items()}
    optimizer = torch.optim.SGD(
        list(params.values()), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    n, num_views = task.train_views.shape[:2]
    size = min(config.batch_size, n)
    iterations = n // config.batch_size if n >= config.batch_size else 1
    for epoch in range(config.epochs):
        rate = (
            config.warmup_lr if epoch == 0 else 0.5 * config.lr * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
        )
        optimizer.param_groups[0]["lr"] = rate
        order = torch.randperm(n, generator=gen)
        views = torch.randint(num_views, (n,), generator=gen)
        for it in range(iterations):
            items = order[it * size : (it + 1) * size]
            features = normalise(task.train_views[items, views[items]])
            logits = logits_fn(params, features)
            loss = F.cross_entropy(logits, task.train_labels[items])
            optimizer.zero_grad()
            if prograd:
                names = list(params)
                g_d = torch.autograd.grad(loss, [params[k] for k in names], retain_graph=True)
                g_g = plain_kl_gradient(logits, teacher_fn(features), [params[k] for k in names])
                for name, d, g in zip(names, g_d, g_g, strict=True):
                    params[name].grad = plain_project(d, g, config.lam)
            else:
                loss.backward()
            optimizer.step()
    return {name: p.detach() for name, p in params.items()}


@pytest.mark.parametrize("prograd", [False, True])
def test_cosine_classifier_matches_a_plain_sgd_loop(prograd):
    method = "cosine+prograd" if prograd else "cosine"
    task = make_task(method, epochs=3, batch_size=8, lr=0.5)
    result = HEADS[method].fit(task)
    plain = make_task(method, epochs=3, batch_size=8, lr=0.5)
    initial = normalise(torch.randn(plain.text_weights.shape, generator=plain.generator))  # then the batches
    expected = plain_coop_loop(
        plain,
        {"weight": initial},
        lambda p, f: 100.0 * f @ normalise(p["weight"]).T,
        prograd,
        lambda f: 100.0 * f @ plain.text_weights.T,  # the zero-shot classifier
    )
    assert_close(result.state["weight"], expected["weight"], what="cosine classifier")
    assert [r["epoch"] for r in result.log] == [0, 1, 2] and result.log[0]["lr"] == plain.config.warmup_lr


@pytest.mark.parametrize("prograd", [False, True])
def test_linear_probe_matches_a_plain_sgd_loop_with_per_tensor_projection(prograd):
    method = "linear_sgd+prograd" if prograd else "linear_sgd"
    task = make_task(method, epochs=3, batch_size=8, lr=0.01, weight_decay=0.05)
    result = HEADS[method].fit(task)
    plain = make_task(method, epochs=3, batch_size=8, lr=0.01, weight_decay=0.05)
    initial = {"weight": plain.text_weights.clone(), "bias": torch.zeros(plain.num_classes)}
    # the teacher: the zero-shot logits by the probe's own expression at its zero-shot start
    expected = plain_coop_loop(
        plain,
        initial,
        lambda p, f: 100.0 * (f @ p["weight"].T + p["bias"]),
        prograd,
        lambda f: 100.0 * (f @ initial["weight"].T + initial["bias"]),
    )
    assert (expected["bias"]).abs().max() > 1e-3
    assert_close(result.state["weight"], expected["weight"], what="linear weight")
    assert_close(result.state["bias"], expected["bias"], what="linear bias")
    if prograd:
        assert any(r["conflict_fraction"] > 0 for r in result.log)  # the projection did act


# -------------------------------------------------------------------------------------------------- bad input
def assert_one_sentence(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f", "tip_adapter_f+prograd", "gda"])
def test_an_empty_validation_split_is_refused_where_a_search_needs_it(method):
    task = make_task(method)
    task.val_features, task.val_labels = task.val_features[:0], task.val_labels[:0]
    with pytest.raises(FastPromptError) as error:
        HEADS[method].fit(task)
    assert_one_sentence(error)
    assert "validation split is empty" in str(error.value)


def test_methods_without_a_search_run_with_an_empty_validation_split():
    task = make_task("cosine", epochs=1)
    task.val_features, task.val_labels = task.val_features[:0], task.val_labels[:0]
    assert HEADS["cosine"].fit(task).log


def test_gda_with_one_view_of_one_image_per_class_is_refused():
    task = make_task("gda", shots=1, views=1)
    with pytest.raises(FastPromptError) as error:
        HEADS["gda"].fit(task)
    assert_one_sentence(error)
    assert "V > 1" in str(error.value)
    HEADS["gda"].fit(make_task("gda", shots=1, views=2))  # two views give a within-class scatter


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: setattr(t, "train_views", t.train_views[:, 0]), "(n, V, D)"),
        (lambda t: setattr(t, "train_labels", t.train_labels + 1), "labels must lie in"),
        (lambda t: setattr(t, "text_weights", t.text_weights[:, :-1]), "text_weights must be"),
        (lambda t: setattr(t, "test_labels", t.test_labels[:-1]), "test labels must be"),
    ],
)
def test_bad_shapes_and_labels_are_one_sentence(change, words):
    task = make_task("clap")
    change(task)
    with pytest.raises(FastPromptError) as error:
        HEADS["clap"].fit(task)
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_clap_and_gda_refuse_a_class_without_training_images():
    for method in ("clap", "gda"):
        task = make_task(method)
        task.train_labels = torch.where(task.train_labels == 4, 3, task.train_labels)
        with pytest.raises(FastPromptError, match="per class"):
            HEADS[method].fit(task)
