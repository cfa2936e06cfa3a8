"""Every method of fastprompt, declared once: what it trains, its loss, its defaults, what it needs from the cache.

The engine, the sweep, the configuration and the report read these declarations instead of testing method names.
This module imports nothing of the package that plugs into it: the trainers live elsewhere and find their method here
(`fastprompt.train.sweep` for prompts, `fastprompt.train.cocoop` for CoCoOp, `fastprompt.heads` for cached-feature
heads, the latter looked up lazily by name). It does not import torch.

Kinds (who trains a run):
- ``zeroshot``: no training; a zero-shot classifier from templates.
- ``probe``: CoOp's linear probe (lpclip, scikit-learn style closed search).
- ``prompt``: learned context vectors in front of the class names, trained in lock-step by `LockstepEngine`.
- ``cocoop``: context plus a meta-net on the image feature, trained by `CocoopEngine` (per-image prompts).
- ``head``: a classifier on the cached image features (Tip-Adapter, GDA, CLAP, cosine, linear), `fastprompt.heads`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("zeroshot", "probe", "prompt", "cocoop", "head")


@dataclass(frozen=True)
class Method:
    """One method's declaration.

    Attributes:
        name: the name on the command line and in result files.
        kind: who trains it (module docstring).
        display: the name in report tables.
        trainable: the tensors it trains, in the order of its segments in the fused update.
        loss: what its update gradient is, in words (docs and `fastprompt train --help`).
        teacher: the zero-shot head that gives G_g or the KL target: "single" (the dataset's hand-crafted template),
            "ensemble" (the template ensemble), or None.
        update: "sgd" (plain), "prograd" (G_d projected against G_g where they conflict), "kd" (G_d + alpha G_g),
            "closed_form" (no gradient steps), or "head" (the head's own optimiser).
        knob: the swept knob that tells runs apart in tables and run ids: "lambda", "alpha" or None.
        defaults: RunConfig fields this method sets when the user does not (its paper's or release's values).
        needs: what it needs from the cache: "views" (augmented training views), "center" (the centre-crop feature of
            training images), "val" (a non-empty few-shot validation split).
        source: where the defaults come from.
        order: the row order in report tables.
        paper: rows of the ProGrad paper this method reproduces (tables/figures), for the report.
        prompt_prefix: the words the context is initialised from when fixed by the method ("a photo of a" for
            KgCoOp); None: the dataset's ProGrad template.
        text_distance: KgCoOp's weight on 1 - cos(learned class text feature, hand-crafted one); 0: none.
        templates: a zero-shot method's class weights: "single" (the dataset's CoOp template) or "ensemble".
    """

    name: str
    kind: str
    display: str
    trainable: tuple[str, ...] = ()
    loss: str = ""
    teacher: str | None = None
    update: str = "sgd"
    knob: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    source: str = ""
    order: int = 100
    paper: tuple[str, ...] = ()
    prompt_prefix: str | None = None
    text_distance: float = 0.0
    templates: str = "single"

    @property
    def trained(self) -> bool:
        return self.kind in ("prompt", "cocoop") or (self.kind == "head" and self.update != "closed_form")

    @property
    def uses_prompt(self) -> bool:
        """Trained as context vectors by the lock-step prompt engine."""
        return self.kind == "prompt"

    @property
    def projects(self) -> bool:
        return self.update == "prograd"


PROMPT_DEFAULTS = {"n_ctx": 16, "batch_size": 32, "lr": 0.002}  # PROTOCOL.md sections 2 and 4
CTX = ("ctx",)
COCOOP_TENSORS = ("ctx", "meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                  "meta_net.linear2.bias")  # fmt: skip
COCOOP_DEFAULTS = {"n_ctx": 4, "batch_size": 1, "epochs": 10, "lr": 0.002}  # configs/trainers/CoCoOp (RN50, c4)

_DECLARED = (
    Method(
        "zeroshot",
        "zeroshot",
        "Zero-shot CLIP",
        loss="none (hand-crafted template)",
        order=0,
        paper=("Table 1", "Figure 4", "Table 2", "Table 3", "Table 4"),
    ),
    Method(
        "zeroshot_ensemble",
        "zeroshot",
        "CLIP++",
        loss="none (template ensemble)",
        order=1,
        paper=("Table 1", "Figure 4"),
        templates="ensemble",
    ),
    Method(
        "linear_probe",
        "probe",
        "Linear probe",
        loss="L2-regularised logistic regression (lpclip)",
        needs=("center",),
        order=2,
        source="CoOp's lpclip",
        paper=("Figure 4",),
    ),
    Method(
        "coop",
        "prompt",
        "CoOp",
        CTX,
        "CE",
        defaults={**PROMPT_DEFAULTS, "init": "random"},
        order=10,
        source="PROTOCOL.md (CoOp's release)",
        paper=("Table 1", "Figure 4", "Table 2", "Table 3", "Table 4"),
    ),
    Method(
        "cocoop",
        "cocoop",
        "CoCoOp",
        COCOOP_TENSORS,
        "CE (per-image context: ctx + meta-net(image))",
        defaults=COCOOP_DEFAULTS,
        order=11,
        source="CoOp release, configs/trainers/CoCoOp (RN50, c4)",
        paper=("Table 2", "Table 3", "Table 4"),
    ),
    Method(
        "kgcoop",
        "prompt",
        "KgCoOp",
        CTX,
        "CE + 8 (1 - cos(learned class text, hand-crafted class text))",
        defaults={"n_ctx": 4, "batch_size": 128, "lr": 0.002, "epochs": 100, "init": "template"},
        order=12,
        source="KgCoOp release (Yao et al. CVPR 2023): W 8.0, 'a photo of a', 4 context vectors",
        prompt_prefix="a photo of a",
        text_distance=8.0,
    ),
    Method(
        "kd",
        "prompt",
        "KD",
        CTX,
        "CE + alpha KL(zero-shot || prompt)",
        teacher="single",
        update="kd",
        knob="alpha",
        defaults={**PROMPT_DEFAULTS, "init": "template"},
        order=20,
        paper=("Table 5",),
    ),
    Method(
        "prograd",
        "prompt",
        "ProGrad",
        CTX,
        "CE, projected against the KL's gradient where they conflict",
        teacher="single",
        update="prograd",
        knob="lambda",
        defaults={**PROMPT_DEFAULTS, "init": "template"},
        order=30,
        source="PROTOCOL.md (ProGrad's release)",
        paper=("Table 1", "Figure 4", "Table 2", "Table 3", "Table 4", "Table 5", "Table 7", "Figure 6"),
    ),
    Method(
        "prograd_ensemble",
        "prompt",
        "ProGrad++",
        CTX,
        "as ProGrad, G_g from the template ensemble",
        teacher="ensemble",
        update="prograd",
        knob="lambda",
        defaults={**PROMPT_DEFAULTS, "init": "template"},
        order=31,
        paper=("Table 1", "Figure 4"),
    ),
    Method(
        "prograd_cocoop",
        "cocoop",
        "ProGrad (CoCoOp)",
        COCOOP_TENSORS,
        "CoCoOp's CE, each tensor projected against its own KL gradient",
        teacher="single",
        update="prograd",
        knob="lambda",
        defaults=COCOOP_DEFAULTS,
        order=32,
        source="as cocoop; projection per parameter tensor",
    ),
)

# Cached-feature heads (fastprompt.heads, issue 11; the cosine classifier is the paper's Table 6). Their defaults
# live beside their code (fastprompt.heads.HEADS[name].defaults) and are read when a run is resolved.
_HEADS = (
    ("tip_adapter", "Tip-Adapter", "closed_form", ("views", "val"), 50),
    ("tip_adapter_f", "Tip-Adapter-F", "head", ("views", "val"), 51),
    ("tip_adapter_f+prograd", "Tip-Adapter-F + ProGrad", "prograd", ("views", "val"), 52),
    ("gda", "GDA", "closed_form", ("views", "val"), 53),
    ("clap", "CLAP", "head", (), 54),
    ("clap+prograd", "CLAP + ProGrad", "prograd", (), 55),
    ("cosine", "Cosine classifier", "head", (), 40),
    ("cosine+prograd", "Cosine classifier + ProGrad", "prograd", (), 41),
    ("linear_sgd", "Linear probe (SGD)", "head", (), 42),
    ("linear_sgd+prograd", "Linear probe (SGD) + ProGrad", "prograd", (), 43),
)

METHODS: dict[str, Method] = {m.name: m for m in _DECLARED}
for _name, _display, _update, _needs, _order in _HEADS:
    METHODS[_name] = Method(
        _name,
        "head",
        _display,
        loss="the head's loss" + (", projected against the KL's gradient per tensor" if _update == "prograd" else ""),
        teacher="single" if _update == "prograd" else None,
        update=_update,
        knob="lambda" if _update == "prograd" else None,
        needs=_needs,
        order=_order,
        source="fastprompt.heads (docs/adapters.md)",
        paper=("Table 6",) if _name.startswith("cosine") else (),
    )
METHODS = dict(sorted(METHODS.items(), key=lambda item: item[1].order))
NAMES = tuple(METHODS)


def method(name: str) -> Method:
    """The declaration of `name`.

    Raises:
        KeyError: not a method (callers check names with `fastprompt.train.config.resolve`, which says so in words).
    """
    return METHODS[name]


def head_defaults(name: str, dataset: str = "") -> dict[str, Any]:
    """The RunConfig defaults of head `name` (on `dataset`), from its module (imported here, at lookup time)."""
    from fastprompt.heads import HEADS

    spec = HEADS.get(name)
    if spec is None:
        return {}
    return {**spec.defaults, **(getattr(spec, "dataset_defaults", None) or {}).get(dataset, {})}


def defaults_of(name: str, dataset: str = "") -> dict[str, Any]:
    """The RunConfig values method `name` sets where the user gave none (on `dataset`, for heads with per-dataset
    values)."""
    declared = METHODS[name]
    return head_defaults(name, dataset) if declared.kind == "head" else dict(declared.defaults)
