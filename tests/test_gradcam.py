"""`fastprompt gradcam`: the CAM maths against a plain Grad-CAM, the prompt layout of each head, the figure, the CLI.

Models: fastprompt-tiny (a ViT) and a tiny ResNet registered here, both with random weights. The CLI tests run on a
real feature cache and real runs made by `fastprompt cache` and `fastprompt train` on generated images.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from fastprompt.cli.app import load_commands
from numerics import assert_close, relative_error
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fastprompt.clip import load_clip, register_model_configs
from fastprompt.gradcam import Head, PromptRun, grad_cam, gradcam_figure, prompt_head, read_class_source
from fastprompt.zeroshot import zero_shot_weights

pytest.importorskip("pytorch_grad_cam")

TINY = "fastprompt-tiny"
TINY_RESNET = "fastprompt-test-gradcam-rn"
CLASSES = ("circle", "square", "star")


def one_sentence(message: str) -> bool:
    return message.endswith(".") and not re.search(r"[.!?]\s", message)


@pytest.fixture(scope="module", autouse=True)
def tiny_resnet():
    """A ResNet image tower (open_clip's ModifiedResNet, 64 px, one block per stage) beside fastprompt-tiny's text."""
    register_model_configs()
    configs = open_clip.factory._MODEL_CONFIGS
    config = copy.deepcopy(configs[TINY])
    config["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(configs, TINY_RESNET, config)
        yield


def _random_clip(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return load_clip(name)


# ------------------------------------------------------------------------------------------- the CAM maths
def plain_grad_cam(clip, class_weights, images, targets):
    """Grad-CAM by hand: hooks on the target layer (a ResNet's last block; the tokens entering a ViT's last block,
    class token dropped, patches as a grid), weights = spatial mean of d score / d activation, ReLU of the weighted
    sum, min-max normalised, bilinearly upsampled to the image, normalised again."""
    visual = clip.model.visual
    is_vit = hasattr(visual, "transformer")
    layer = visual.transformer.resblocks[-1].ln_1 if is_vit else visual.layer4[-1]
    saved = {}
    handle = layer.register_forward_hook(lambda module, args, output: saved.update(activations=output))
    try:
        inputs = images.clone().requires_grad_(True)
        logits = clip.logit_scale * F.normalize(visual(inputs), dim=-1) @ class_weights.T
    finally:
        handle.remove()
    chosen = [int(logits[i].argmax()) if target is None else target for i, target in enumerate(targets)]
    score = logits[torch.arange(len(chosen)), torch.tensor(chosen)].sum()
    (gradients,) = torch.autograd.grad(score, saved["activations"])
    activations = saved["activations"].detach()
    if is_vit:
        grid = visual.grid_size
        activations, gradients = (t[:, 1:].reshape(t.shape[0], *grid, -1).permute(0, 3, 1, 2)
                                  for t in (activations, gradients))  # fmt: skip
    weights = gradients.mean(dim=(2, 3))
    cams = torch.relu((weights[:, :, None, None] * activations).sum(dim=1))

    def normalise(maps):
        maps = maps - maps.amin(dim=(1, 2), keepdim=True)
        return maps / (1e-7 + maps.amax(dim=(1, 2), keepdim=True))

    upsampled = F.interpolate(normalise(cams)[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
    return normalise(upsampled[:, 0]), logits.detach(), chosen


@pytest.mark.parametrize("model", [TINY, TINY_RESNET])
def test_the_library_cam_equals_a_plain_grad_cam(model):
    clip = _random_clip(model)
    generator = torch.Generator().manual_seed(1)
    class_weights = F.normalize(torch.randn(5, clip.model.text_projection.shape[1], generator=generator), dim=-1)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    targets = [2, None, 0, None]  # known classes are explained as given, the others by each head's prediction
    result = grad_cam(clip, Head("head", class_weights), images, targets)
    expected, logits, chosen = plain_grad_cam(clip, class_weights, images, targets)
    assert result.cams.shape == (4, 64, 64)
    assert_close(torch.from_numpy(result.cams), expected)
    assert_close(result.probabilities, logits.softmax(dim=-1))
    assert result.targets == chosen and result.predictions == logits.argmax(dim=-1).tolist()
    spans = expected.amax(dim=(1, 2)) - expected.amin(dim=(1, 2))
    assert (spans > 0.5).sum() >= 2, "the maps compared must not be flat (a layer without gradients gives zeros)"


def test_a_vit_block_output_carries_no_patch_gradient():
    """Why a ViT's map reads the tokens entering the last block: only the class token of its output is pooled."""
    clip = _random_clip(TINY)
    block = clip.model.visual.transformer.resblocks[-1]
    saved = {}
    handle = block.register_forward_hook(lambda module, args, output: saved.update(tokens=output))
    try:
        features = clip.model.visual(torch.randn(2, 3, 64, 64).requires_grad_(True))
    finally:
        handle.remove()
    (gradients,) = torch.autograd.grad(features.sum(), saved["tokens"])
    assert gradients[:, 1:].abs().max() == 0 and gradients[:, 0].abs().max() > 0


# ------------------------------------------------------------------------------------------- the heads
def test_a_template_run_keeps_its_template_tokens():
    """A ProGrad context holding the template's own token embeddings is the template: its head equals zero-shot
    CLIP's with that template. The comma template's last "a" lies after the 8 context vectors and stays fixed, so a
    layout without the template (CoOp's) differs."""
    clip = _random_clip(TINY)
    template = "a type of shape, a photo of a {}."
    tokens = clip.tokenizer([template.format("x")])[0]
    ctx = clip.model.token_embedding(tokens[1:9]).detach().float()  # "a type of shape , a photo of"
    expected = zero_shot_weights(clip, list(CLASSES), template)

    def run(method: str, init: str) -> PromptRun:
        config = {"method": method, "init": init, "n_ctx": 8, "position": "end", "class_specific": False}
        return PromptRun(Path("run"), ctx, config, {"model": TINY}, method, CLASSES)

    assert_close(prompt_head(clip, CLASSES, run("prograd", "template"), template).class_weights, expected)
    assert relative_error(prompt_head(clip, CLASSES, run("coop", "random"), template).class_weights, expected) > 1e-2


# ------------------------------------------------------------------------------------------- cache, runs, CLI
def _write_images(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for index, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for image in range(per_class):
            pixels = rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)
            pixels[12:36, 14:42] = 60 * (index + 1)  # a block per class, so the classes differ
            Image.fromarray(pixels).save(folder / f"{name}{image}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A feature cache (fastprompt-tiny, seeded random weights) and CoOp, ProGrad and zero-shot runs trained on it."""
    root = tmp_path_factory.mktemp("gradcam")
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        _write_images(root / "photos" / split, 2, seed)
    runner, app = CliRunner(), load_commands()
    cache = root / "cache"
    options = ["--model", TINY, "--pretrained", "none", "--shots", "1", "--seeds", "1", "--views", "1",
               "--num-workers", "0", "--no-progress", "--out", str(cache)]  # fmt: skip
    built = runner.invoke(app, ["cache", "imagefolder", "--root", str(root / "photos"), "--name", "Blocks", *options])
    assert built.exit_code == 0, built.output
    runs = root / "runs"
    sweep = runner.invoke(app, ["train", "--cache", str(cache), "--out", str(runs), "--methods",
                                "zeroshot,coop,prograd", "--epochs", "1", "--no-progress"])  # fmt: skip
    assert sweep.exit_code == 0, sweep.output
    folders = {path.name.split("-")[0]: path for path in runs.iterdir() if path.is_dir()}
    return root, cache, folders


def _invoke(args: list[str]):
    return CliRunner().invoke(load_commands(), ["gradcam", *args])


def test_the_figure_is_a_grid_of_the_images_and_the_heads(trained):
    root, cache, runs = trained
    test = root / "photos" / "test"
    images = [test / "circle", test / "star" / "star1.png"]  # a folder (two images) and a file
    out = root / "figures" / "grid.png"
    figure = gradcam_figure(images, out, TINY, pretrained="none", prompts=[runs["coop"], runs["prograd"]],
                            cell_inches=1.0, dpi=50)  # fmt: skip
    assert [head.label for head in figure.heads] == ["zero-shot CLIP", "CoOp", "ProGrad"]
    assert figure.classnames == CLASSES  # the classes the first run records
    truths = [CLASSES.index(path.parent.name) for path in figure.images]
    assert figure.truths == truths and len(truths) == 3  # each image's folder names its class
    assert all(result.targets == truths for result in figure.results)  # the maps explain the true class
    with Image.open(out) as drawn:
        assert drawn.size == ((1 + 3) * 50, 3 * 50)  # columns: the image and three heads; rows: three images


def test_the_command_writes_the_figure(trained):
    root, cache, runs = trained
    out = root / "cli" / "figure.png"
    result = _invoke([str(root / "photos" / "test" / "square"), "--model", TINY, "--pretrained", "none",
                      "--prompt", str(runs["prograd"]), "--class", "square", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "written to" in result.stdout
    with Image.open(out) as drawn:
        assert drawn.size[0] * 2 == drawn.size[1] * 3  # 3 columns (image, zero-shot CLIP, ProGrad) x 2 rows


def _variant(root: Path, source: Path, name: str, ctx=None, **cache_entry) -> Path:
    """A copy of run `source` with another context or other `cache` entries in its record."""
    folder = root / "variants" / name
    shutil.copytree(source, folder)
    if ctx is not None:
        save_file({"ctx": ctx}, str(folder / "prompt.safetensors"))
    record = json.loads((folder / "result.json").read_text())
    record["cache"].update(cache_entry)
    (folder / "result.json").write_text(json.dumps(record))
    return folder


BAD_INPUTS = {
    "a missing image": ("missing.png", [], "does not exist"),
    "an unreadable image": ("broken.png", [], "Could not read the image"),
    "a prompt of another width": ("photos", ["--prompt", "{wide}"], "takes width"),
    "a prompt of another model": ("photos", ["--prompt", "{rn50}"], "--model RN50"),
    "more prompts than allowed": ("photos", ["--prompt", "{coop}"] * 5, "at most"),
    "a zero-shot run as a prompt": ("photos", ["--prompt", "{zeroshot}"], "no context-only trained prompt"),
    "an unknown class": ("photos", ["--prompt", "{coop}", "--class", "hexagon"], "not one of the 3 classes"),
    "other weights": ("photos", ["--prompt", "{coop}", "--checkpoint", "{other_weights}"], "differ from those"),
    "too many images": ("many", ["--prompt", "{coop}"], "at most"),
    "zero-shot alone without a cache": ("photos", [], "pass --cache"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_sentence_and_writes_nothing(trained, case, tmp_path):
    root, cache, runs = trained
    image, options, expected = BAD_INPUTS[case]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    _write_images(tmp_path / "many", 5, 3)  # 15 images
    ctx = load_file(str(runs["coop"] / "prompt.safetensors"))["ctx"]
    values = {
        "coop": runs["coop"],
        "zeroshot": runs["zeroshot"],
        "wide": _variant(tmp_path, runs["coop"], "wide", ctx=torch.randn(ctx.shape[0], 2 * ctx.shape[1])),
        "rn50": _variant(tmp_path, runs["coop"], "rn50", model="RN50"),
        "other_weights": tmp_path / "other.pt",
    }
    torch.save(_random_clip(TINY, seed=1).model.state_dict(), values["other_weights"])
    weights = [] if "--checkpoint" in options else ["--pretrained", "none"]
    images = root / "photos" / "test" if image == "photos" else tmp_path / image
    out = tmp_path / "out" / "figure.png"
    args = [str(images), "--model", TINY, *weights, *[o.format(**values) for o in options], "--out", str(out)]
    result = _invoke(args)
    assert result.exit_code == 2, result.output
    message = result.stderr.strip().removeprefix("Error: ")
    assert expected in message and one_sentence(message) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_without_the_package_the_command_says_how_to_install_it(trained, monkeypatch):
    root, cache, runs = trained
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # `import pytorch_grad_cam` raises ImportError
    out = root / "nopackage" / "figure.png"
    result = _invoke([str(root / "photos" / "test"), "--model", TINY, "--cache", str(cache), "--out", str(out)])
    assert result.exit_code == 2 and "pip install fastprompt[gradcam]" in result.stderr
    assert not out.parent.exists()


def test_class_names_come_from_the_cache_when_given(trained):
    root, cache, runs = trained
    manifest = json.loads((cache / "manifest.json").read_text())
    other = root / "renamed-cache"
    other.mkdir(exist_ok=True)
    (other / "manifest.json").write_text(json.dumps(dict(manifest, classnames=["ring", "box", "spark"])))
    from fastprompt.gradcam import load_prompt_run

    run = load_prompt_run(runs["coop"])
    assert read_class_source(None, [run]).classnames == CLASSES
    assert read_class_source(other, [run]).classnames == ("ring", "box", "spark")
