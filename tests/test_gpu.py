"""The GPU tier: what only a CUDA device can check. Skipped without one; `bash bench/gpu_check.sh OUTDIR` runs it.

- the fused Triton update with its offsets on the device, called as LockstepEngine calls it, against the reference;
- the engine in bf16 autocast against fp32: the contexts within the suite's bf16 tolerance (tests/numerics.py: twice
  the error of the plain 77-token path run in bf16, plus the bf16 floor) and the projection decisions (conflict flags)
  equal at every step where the fp32 cosine is clear of that tolerance;
- a feature cache extracted on CUDA against the same images extracted on the CPU (tiny model, fp32, TF32 off).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from fastprompt.kernels import prograd_update as pu
from fastprompt.kernels.prograd_update import prograd_update, prograd_update_ref
from numerics import assert_close, tolerance
from PIL import Image

from fastprompt.cache.extract import build_cache
from fastprompt.cache.loader import FeatureCache
from fastprompt.cache.plan import CacheOptions
from fastprompt.clip import load_clip
from fastprompt.data.own import read_image_folder
from fastprompt.encoder import PromptEncoder
from fastprompt.train.config import RunConfig, Schedule, resolve
from fastprompt.train.engine import LockstepEngine, RunState, update_step
from fastprompt.train.sweep import AUTOCAST
from fastprompt.zeroshot import zero_shot_weights

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
NAMES = ["abyssinian", "basset hound", "great pyrenees", "sphynx", "yorkshire terrier", "pug", "samoyed"]
PREFIX = "a type of pet, a photo of a"


@pytest.fixture(scope="module")
def tiny_cuda():
    torch.manual_seed(0)
    return load_clip("fastprompt-tiny", device=CUDA)


class Recorder:
    """The fused update, recording each step's cosines and conflict flags (per run) on the host."""

    def __init__(self, update_fn=prograd_update) -> None:
        self.update_fn, self.cos, self.conflict = update_fn, [], []

    def __call__(self, *args):
        stats = self.update_fn(*args)
        self.cos.append(stats.cos.float().cpu())
        self.conflict.append(stats.conflict.cpu())
        return stats


class PlainPath:
    """The encoder seen through its plain full-context path: the reference the fast path is held to."""

    def __init__(self, encoder: PromptEncoder) -> None:
        self._encoder = encoder

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def __call__(self, ctx, class_index=None):
        return self._encoder.reference(ctx, class_index)


def make_engine(clip, runs: int = 3, precision: str = "fp32", update_fn=prograd_update, plain: bool = False):
    """`runs` ProGrad runs (lambda 1, seeds 1..runs) of the tiny model on CUDA: 24 images, 2 views, one batch."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(24, 2, 64, generator=generator)
    labels = torch.arange(24) % len(NAMES)
    teacher = zero_shot_weights(clip, NAMES, PREFIX + " {}.")
    encoder = PromptEncoder(clip, NAMES, n_ctx=16, prompt_prefix=PREFIX)
    states = []
    for seed in range(1, runs + 1):
        config = resolve(RunConfig(method="prograd", dataset="OxfordPets", shots=2, seed=seed, lam=1.0, epochs=20))
        schedule = Schedule(len(labels), config.batch_size, config.epochs, config.lr, config.warmup_lr)
        states.append(RunState(config, torch.arange(len(labels)), labels, schedule,
                               torch.Generator().manual_seed(seed), teacher="zs"))  # fmt: skip
    contexts = encoder.initial_context("template").expand(runs, -1, -1).clone()
    return LockstepEngine(PlainPath(encoder) if plain else encoder, features, states, contexts, {"zs": teacher},
                          clip.logit_scale, update_fn=update_fn, autocast_dtype=AUTOCAST[precision])  # fmt: skip


@contextlib.contextmanager
def fp32_only():
    """TF32 off for convolutions and matrix products (fp32 means fp32 on both devices), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def contexts_of(engine: LockstepEngine) -> torch.Tensor:
    return torch.stack([engine.context(i).clone() for i in range(len(engine.runs))])


def test_fused_update_with_device_offsets_as_the_engine_calls_it():
    """37 runs x one 16 x 512 context, offsets and per-run scalars built on the device as LockstepEngine._update
    builds them (nothing read back to the host), three steps (first step with NaN momentum, then mixed first steps)."""
    assert pu.use_triton(CUDA), "CUDA tensors must take the Triton kernels"
    runs, segment = 37, 16 * 512
    generator = torch.Generator(device=CUDA).manual_seed(0)
    params = torch.randn(runs * segment, device=CUDA, generator=generator)
    momentum_buf = torch.full_like(params, float("nan"))  # first step: must be overwritten, never read
    offsets = torch.arange(runs + 1, dtype=torch.long, device=CUDA) * segment
    sign = torch.where(torch.arange(runs, device=CUDA) % 2 == 0, -1.0, 1.0).repeat_interleave(segment)

    def per_run(values):
        return torch.tensor(values, dtype=torch.float32).to(CUDA, non_blocking=True)

    lam = per_run([1.0 if r % 3 else 0.8 for r in range(runs)])
    momentum = per_run([0.9] * runs)
    weight_decay = per_run([5e-4] * runs)
    fused_state, ref_state = (params.clone(), momentum_buf.clone()), (params.clone(), momentum_buf.clone())
    for step in range(3):
        g_d = torch.randn(runs * segment, device=CUDA, generator=generator)
        g_g = sign * 0.5 * g_d + torch.randn(runs * segment, device=CUDA, generator=generator)
        lr = per_run([0.002 * (1 + r / runs) for r in range(runs)])
        first_step = torch.full((runs,), step == 0, device=CUDA)
        if step == 2:
            first_step[::5] = True  # a restarted run's buffer is replaced, the others accumulate
        args = (g_d, g_g, offsets, lam, lr, momentum, weight_decay, first_step)
        fused = update_step(*fused_state, *args, update_fn=prograd_update)
        ref = update_step(*ref_state, *args, update_fn=prograd_update_ref)
        assert_close(fused_state[0], ref_state[0], what=f"step {step} params")
        assert_close(fused_state[1], ref_state[1], what=f"step {step} momentum")
        assert_close(fused.cos, ref.cos, what=f"step {step} cos")
        assert torch.equal(fused.conflict, ref.conflict), f"step {step}: conflict flags differ"
        assert fused.conflict[::2].all() and not fused.conflict[1::2].any(), "even runs conflict, odd ones agree"


def test_engine_on_cuda_fused_equals_reference_update(tiny_cuda):
    fused, ref = make_engine(tiny_cuda, update_fn=Recorder()), make_engine(tiny_cuda, update_fn=prograd_update_ref)
    for _ in range(6):
        fused.step()
        ref.step()
    assert_close(contexts_of(fused), contexts_of(ref), what="contexts after 6 steps")
    assert all(fused.collect(i) for i in range(3)), "a run diverged"


def test_engine_bf16_autocast_against_fp32_step_by_step(tiny_cuda):
    steps = 8
    recorders = {name: Recorder() for name in ("fp32", "bf16", "plain_bf16")}
    engines = {
        "fp32": make_engine(tiny_cuda, update_fn=recorders["fp32"]),
        "bf16": make_engine(tiny_cuda, precision="bf16", update_fn=recorders["bf16"]),
        "plain_bf16": make_engine(tiny_cuda, precision="bf16", update_fn=recorders["plain_bf16"], plain=True),
    }
    start = contexts_of(engines["fp32"])
    for _ in range(steps):
        for engine in engines.values():
            engine.step()
    deltas = {name: contexts_of(engine) - start for name, engine in engines.items()}
    assert_close(deltas["bf16"], deltas["fp32"], dtype=torch.bfloat16, low_precision_reference=deltas["plain_bf16"],
                 what="bf16 autocast: the contexts' change over 8 steps")  # fmt: skip
    fp32, bf16, plain = recorders["fp32"], recorders["bf16"], recorders["plain_bf16"]
    cos_error = max(float((p - f).abs().max()) for p, f in zip(plain.cos, fp32.cos, strict=True))
    margin = tolerance(torch.bfloat16, cos_error)  # a decision closer to cos = 0 than this may flip in bf16
    compared = 0
    for step, (flags16, flags32, cos32) in enumerate(zip(bf16.conflict, fp32.conflict, fp32.cos, strict=True)):
        clear = cos32.abs() > margin
        assert torch.equal(flags16[clear], flags32[clear]), (
            f"step {step}: bf16 projected {flags16.tolist()}, fp32 {flags32.tolist()} (cos {cos32.tolist()}, margin "
            f"{margin:.3g})"
        )
        compared += int(clear.sum())
    assert compared > 0, f"every cosine lies within {margin:.3g} of 0: no decision was compared"
    assert any(flags.any() for flags in fp32.conflict), "the test should exercise the projection"


def test_cache_features_on_cuda_equal_cpu(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split, count in (("train", 3), ("test", 2)):
        for label in range(2):
            for index in range(count):
                path = root / split / f"class_{label}" / f"{index}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    dataset = read_image_folder(root, name="GpuToy")
    options = CacheOptions(shots=(), seeds=(), views=2, full_train=True, dtype="float32", shard_size="1000")
    caches = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        clip = load_clip("fastprompt-tiny")
        with fp32_only():
            build_cache(dataset, clip, tmp_path / device, options, device=device, precision="fp32", num_workers=0,
                        progress=False)  # fmt: skip
        caches[device] = FeatureCache(tmp_path / device)
    for split in ("train", "test"):
        cpu, cuda = caches["cpu"].split(split), caches["cuda"].split(split)
        assert cuda.keys == cpu.keys and torch.equal(cuda.labels, cpu.labels)
        assert_close(cuda.features, cpu.features, what=f"{split} features, CUDA vs CPU")
    assert_close(caches["cuda"].split("train").center, caches["cpu"].split("train").center, what="centre views")
