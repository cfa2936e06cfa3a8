"""Run configuration: one frozen dataclass per run with PROTOCOL.md's defaults, and sweeps as cartesian products.

Field names match the command-line options (`--lambda` is the field `lam`, written `lambda` in files and results).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fastprompt.errors import ConfigError, brief, one_line
from fastprompt.methods import METHODS as DECLARED
from fastprompt.methods import defaults_of

METHODS = tuple(DECLARED)
PROMPT_METHODS = tuple(name for name, m in DECLARED.items() if m.kind == "prompt")
TEACHER_METHODS = tuple(name for name, m in DECLARED.items() if m.teacher is not None)
LAMBDA_METHODS = tuple(name for name, m in DECLARED.items() if m.knob == "lambda")
# PROTOCOL.md; a method's declaration may override each
GLOBAL_DEFAULTS = {"n_ctx": 16, "batch_size": 32, "lr": 0.002, "warmup_lr": 1e-5, "warmup_epochs": 1, "momentum": 0.9,
                   "weight_decay": 5e-4}  # fmt: skip
# Fields added after the first release: left out of the run id's hash at their default, so older sweeps keep theirs.
LATER_FIELDS = {"teacher": None, "augment": True, "angles": False}
SETTINGS = ("fewshot", "base2new")
LAMBDA_POLICIES = ("release", "paper")
LOW_LAMBDA_DATASETS = ("OxfordFlowers", "DescribableTextures", "EuroSAT")
IMAGENET = "ImageNet"
MAX_SWEEP_RUNS = 100_000  # far above any real sweep (the paper's grids are a few hundred runs); a typo can ask 10**12


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run. `None` means "PROTOCOL.md's default for this run", resolved by `resolve`."""

    method: str = "prograd"
    dataset: str = ""
    setting: str = "fewshot"
    shots: int = 16
    seed: int = 1
    lam: float | None = None  # ProGrad's lambda; None: 1.0, or 0.8 by the lambda policy
    lambda_policy: str = "release"  # lambda when lam is None: "release" or "paper" (see default_lambda)
    alpha: float = 1.0  # knowledge distillation weight of the KL term
    temperature: float = 1.0
    n_ctx: int | None = None  # None: the method's (16; CoCoOp and KgCoOp 4)
    init: str | None = None  # "template" (ProGrad, KD) or "random" (CoOp); None: by method
    position: str = "end"
    class_specific: bool = False
    epochs: int | None = None  # None: the method's, else 50 / 100 / 200 by shots (PROTOCOL.md section 4), ImageNet 50
    batch_size: int | None = None  # None: the method's (32; CoCoOp 1, KgCoOp 128)
    lr: float | None = None  # None: the method's (0.002); epoch e >= 1 uses lr / 2 * (1 + cos(pi * (e - 1) / E))
    warmup_lr: float | None = None  # None: the method's (1e-5), the constant learning rate of the warm-up epochs
    warmup_epochs: int | None = None  # None: the method's (1)
    momentum: float | None = None  # None: the method's (0.9)
    weight_decay: float | None = None  # None: the method's (5e-4)
    precision: str = "fp32"  # compute precision of the text tower: fp32, bf16 or fp16 (autocast; fp32 master context)
    eval_every: int = 0  # evaluate the test split every k epochs (0: only after the last epoch)
    teacher: str | None = None  # a trained prompt (run folder) as the KL target instead of the template (Figure 7)
    augment: bool = True  # False: train on each training image's centre-crop view only (Figure 1 c, d)
    angles: bool = False  # log the G_d/G_g angle of runs that do not project (CoOp, KD): G_g computed, not used

    def to_dict(self) -> dict[str, Any]:
        """Field names as on the command line and in result files (`lam` is written `lambda`)."""
        data = dataclasses.asdict(self)
        data["lambda"] = data.pop("lam")
        return data

    @property
    def run_id(self) -> str:
        """A readable, unique folder name: method, dataset, shots, seed, the swept knobs, and a config hash."""
        hashed = {k: v for k, v in self.to_dict().items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
        digest = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:8]
        shots = f"{self.shots}shot" if self.shots else "fulltrain"
        parts = [self.method.replace("+", "-"), self.dataset or "data", shots, f"seed{self.seed}"]
        if self.setting != "fewshot":
            parts.insert(2, self.setting)
        knob = DECLARED[self.method].knob if self.method in DECLARED else None
        if knob == "lambda":
            parts.append(f"lam{self.lam:g}")
        if knob == "alpha":
            parts.append(f"alpha{self.alpha:g}")
        if self.teacher:
            parts.append("trainedteacher")
        if not self.augment:
            parts.append("noaug")
        return "-".join([*parts, digest])

    @property
    def declaration(self):
        """This run's method declaration (fastprompt/methods.py)."""
        return DECLARED[self.method]

    @property
    def uses_prompt(self) -> bool:
        return self.method in PROMPT_METHODS

    @property
    def uses_teacher(self) -> bool:
        """Whether the run needs a teacher's class weights: for its loss or projection, or to log angles."""
        return self.method in TEACHER_METHODS or (self.angles and self.uses_prompt)

    @property
    def lam_used(self) -> float:
        """The projection strength the update applies: lambda for projecting methods, 0 otherwise."""
        return float(self.lam) if DECLARED[self.method].projects and self.lam is not None else 0.0

    @property
    def alpha_used(self) -> float:
        """KD's weight of G_g in the update: alpha for KD, 0 otherwise."""
        return float(self.alpha) if DECLARED[self.method].update == "kd" else 0.0


def default_epochs(shots: int, dataset: str) -> int:
    """50 epochs for 1 shot, 100 for 2 and 4, 200 for 8 and 16; ImageNet 50 for every shot count; 50 on the whole
    training split (shots 0)."""
    if dataset == IMAGENET:
        return 50
    if shots <= 1:
        return 50
    if shots <= 4:
        return 100
    return 200


def default_lambda(dataset: str, shots: int, policy: str = "release") -> float:
    """ProGrad's lambda by policy (PROTOCOL.md section 1).

    "release" (the released code's README): 0.8 at 8 and 16 shots on OxfordFlowers, DescribableTextures and
    EuroSAT, 1.0 otherwise. "paper" (the paper's sentence "0.8 for 16 shots"): 0.8 at 16 shots on every dataset,
    1.0 otherwise.
    """
    if policy == "paper":
        return 0.8 if shots == 16 else 1.0
    return 0.8 if dataset in LOW_LAMBDA_DATASETS and shots in (8, 16) else 1.0


def resolve(config: RunConfig) -> RunConfig:
    """Fill PROTOCOL.md's defaults and check every value; the result is what runs and what is written."""
    from fastprompt.prompt import POSITIONS  # imported here: fastprompt.prompt imports torch, this module does not

    if config.method not in METHODS:
        raise ConfigError(f"Unknown method {brief(config.method)}; use one of {', '.join(METHODS)}.")
    if config.setting not in SETTINGS:
        raise ConfigError(f"Unknown setting {brief(config.setting)}; use one of {', '.join(SETTINGS)}.")
    if config.lambda_policy not in LAMBDA_POLICIES:
        raise ConfigError(f"Unknown lambda policy {brief(config.lambda_policy)}; use 'release' or 'paper'.")
    if config.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"Unknown precision {brief(config.precision)}; use fp32, bf16 or fp16.")
    if config.position not in POSITIONS:
        raise ConfigError(f"Unknown class position {brief(config.position)}; use one of {', '.join(POSITIONS)}.")
    method_defaults = {**GLOBAL_DEFAULTS, **defaults_of(config.method, config.dataset)}
    filled = {k: v for k, v in method_defaults.items() if k in FIELD_NAMES and getattr(config, k) is None}
    config = dataclasses.replace(config, **filled)
    if config.shots < 0:
        raise ConfigError(f"shots must be at least 1, or 0 for the whole training split (got {config.shots}).")
    for name in ("batch_size", "n_ctx"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1 (got {getattr(config, name)}).")
    for name in ("eval_every", "warmup_epochs"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be 0 or more (got {getattr(config, name)}).")
    for item in fields(config):
        value = getattr(config, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{item.name} must be a finite number (got {value}).")
    for name in ("lr", "warmup_lr", "temperature"):
        value = getattr(config, name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number (got {value}).")
    changes: dict[str, Any] = {}
    if config.epochs is None:
        changes["epochs"] = default_epochs(config.shots, config.dataset)
    elif config.epochs < 1:
        raise ConfigError(f"epochs must be at least 1 (got {config.epochs}).")
    if config.lam is None:
        changes["lam"] = default_lambda(config.dataset, config.shots, config.lambda_policy)
    if config.init is None:
        changes["init"] = "template"  # CoOp's "random" comes from its declaration
    elif config.init not in ("template", "random"):
        raise ConfigError(f"Unknown init {brief(config.init)}; use 'template' or 'random'.")
    if config.teacher is not None and not (DECLARED[config.method].teacher and config.uses_prompt):
        raise ConfigError(
            f"A trained teacher (--teacher) is a KL target, which {config.method} does not use; use it with prograd, "
            f"prograd_ensemble or kd."
        )
    return dataclasses.replace(config, **changes)


# ------------------------------------------------------------------------------------------------------ sweeps
FIELD_NAMES = {f.name for f in fields(RunConfig)}
FIELD_KINDS = {f.name: f.type for f in fields(RunConfig)}  # "int", "float | None", ... (annotations are strings)
ALIASES = {"lambda": "lam", "methods": "method", "seeds": "seed", "datasets": "dataset", "lambdas": "lam"}


def _field_name(key: Any) -> str:
    name = ALIASES.get(key, key).replace("-", "_") if isinstance(key, str) else None
    if name not in FIELD_NAMES:
        known = sorted({*FIELD_NAMES - {"lam"}, "lambda"})
        raise ConfigError(f"Unknown sweep key {brief(key)}; known keys: {', '.join(known)}.")
    return name


def _coerce(name: str, value: Any) -> Any:
    """`value`, from a file or the command line, as field `name` takes it; "none" only where the field has a default.

    Raises:
        ConfigError: a list or table, text that is not a number for a number, a fraction for an integer, a word other
            than true/false/yes/no/1/0 for a flag.
    """
    kind = FIELD_KINDS[name]
    invalid = ConfigError(f"{brief(value)} is not a valid value for {name} ({kind}).")
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        if "None" in kind:
            return None
        raise invalid
    if not isinstance(value, str | int | float):  # lists, tables, dates (bool is an int)
        raise invalid
    if "bool" in kind:
        flags = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
        if str(value).strip().lower() not in flags:
            raise invalid
        return flags[str(value).strip().lower()]
    if isinstance(value, bool) and kind != "str":
        raise invalid
    try:
        if "int" in kind and "float" not in kind:
            if isinstance(value, float) and not value.is_integer():
                raise invalid
            return int(value)
        if "float" in kind:
            return float(value)
    except (ValueError, OverflowError):
        raise invalid from None
    return str(value)


def expand_sweep(axes: dict[str, list[Any]], fixed: dict[str, Any] | None = None) -> list[RunConfig]:
    """The cartesian product of `axes` (key -> values) with `fixed` settings for every run, resolved.

    Keys are RunConfig field names or their command-line spellings ("lambda", "batch-size"). `lam` applies to the
    ProGrad methods only and `alpha` to KD only, so a sweep "methods x lambdas" does not repeat CoOp per lambda.
    """
    fixed = {_field_name(k): _coerce(_field_name(k), v) for k, v in (fixed or {}).items() if v is not None}
    names = [_field_name(key) for key in axes]
    values = [[_coerce(name, v) for v in axes[key]] for name, key in zip(names, axes, strict=True)]
    combinations = math.prod(len(options) for options in values)
    if combinations > MAX_SWEEP_RUNS:
        raise ConfigError(
            f"The sweep asks for {combinations} runs, more than {MAX_SWEEP_RUNS}; split it into smaller sweeps."
        )
    runs: dict[str, RunConfig] = {}
    for combo in itertools.product(*values):
        settings = {**fixed, **dict(zip(names, combo, strict=True))}
        method = settings.get("method", "prograd")
        knob = DECLARED[method].knob if method in DECLARED else None
        if knob != "lambda":
            settings.pop("lam", None)
        if knob != "alpha":
            settings.pop("alpha", None)
        declared = DECLARED.get(method)
        if declared is not None and not (declared.teacher and declared.kind == "prompt"):
            settings.pop("teacher", None)  # a trained teacher replaces the template of the prompt methods' KL only
        if declared is not None and declared.kind not in ("prompt", "cocoop"):
            settings.pop("angles", None)
            settings.pop("augment", None)
        config = resolve(RunConfig(**settings))
        runs.setdefault(config.run_id, config)
    return list(runs.values())


def load_sweep_file(path: str | Path) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Read a TOML or YAML sweep: `[sweep]` (lists, the product's axes) and `[fixed]` (one value for all runs).

    Raises:
        ConfigError: the file is missing, unreadable, or has keys other than `sweep` and `fixed` or unknown fields.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Sweep file '{path}' does not exist.")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"Sweep file '{path}' must end in .toml, .yaml or .yml.")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"Sweep file '{path}' is not UTF-8 text (byte {error.start} is not); save it as UTF-8."
        ) from None
    except Exception as error:  # the parsers' errors, and RecursionError or ValueError for pathological nesting
        raise ConfigError(f"Could not parse sweep file '{path}': {_parse_problem(error)}.") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"Sweep file '{path}' must hold the tables [sweep] and [fixed], not a {type(data).__name__}.")
    unknown = sorted(str(section) for section in data if section not in ("sweep", "fixed"))
    if unknown:
        raise ConfigError(f"Sweep file '{path}' has unknown sections {brief(unknown)}; use [sweep] and [fixed].")
    tables = {section: {} if data.get(section) is None else data[section] for section in ("sweep", "fixed")}
    for section, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] of sweep file '{path}' must be a table of keys, not {brief(table)}.")
    axes = {key: value if isinstance(value, list) else [value] for key, value in tables["sweep"].items()}
    for key in [*axes, *tables["fixed"]]:
        _field_name(key)
    for key, values in axes.items():
        if not values:
            raise ConfigError(f"[sweep] {key} of sweep file '{path}' lists no values; give one or more, or remove it.")
    return axes, dict(tables["fixed"])


def _parse_problem(error: Exception) -> str:
    """A parser's complaint on one line: YAML's problem and position (its text spans several lines), or the text."""
    mark = getattr(error, "problem_mark", None)
    if getattr(error, "problem", None) and mark is not None:
        return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return one_line(error).rstrip(".") or type(error).__name__


@dataclass
class Schedule:
    """Per-run step bookkeeping: iterations per epoch (drop-last rule) and the per-epoch learning rate."""

    num_items: int
    batch_size: int
    epochs: int
    lr: float
    warmup_lr: float
    warmup_epochs: int = 1
    iterations: int = field(init=False)

    def __post_init__(self) -> None:
        self.iterations = iterations_per_epoch(self.num_items, self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.iterations * self.epochs

    def lr_at(self, epoch: int) -> float:
        return learning_rate(epoch, self.epochs, self.lr, self.warmup_lr, self.warmup_epochs)


def iterations_per_epoch(num_items: int, batch_size: int) -> int:
    """floor(N / B) when N >= B (the last partial batch is dropped); one batch of all N images when N < B."""
    if num_items < 1:
        raise ConfigError("A run has no training images.")
    return num_items // batch_size if num_items >= batch_size else 1


def learning_rate(epoch: int, epochs: int, lr: float, warmup_lr: float, warmup_epochs: int = 1) -> float:
    """Epoch e (0-based): warmup_lr for e < warmup_epochs, else lr / 2 * (1 + cos(pi * (e - 1) / E)).

    With PROTOCOL.md's lr = 0.002 this is `0.001 * (1 + cos(pi * (e - 1) / E))`. The rate changes once per epoch.
    """
    if epoch < warmup_epochs:
        return warmup_lr
    return lr / 2 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))
