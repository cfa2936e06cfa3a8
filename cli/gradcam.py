"""`fastprompt gradcam`: Grad-CAM of zero-shot CLIP and trained prompts on a few images (arguments in, library call
out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from fastprompt.cli.app import app

HELP = """Draw Grad-CAM maps of zero-shot CLIP and of trained prompts on a few images (the paper's Figure 2).

Rows are images; columns the image, zero-shot CLIP and each prompt, titled with the predicted class and its probability.
A map explains the image's true class where it is known (--class, or the image's folder name when it is a class),
else the column's own prediction. Class names: --cache, else the classes the first prompt's run was trained on.
Needs the grad-cam package (the gradcam extra of fastprompt). Details: docs/gradcam.md.

Examples:

  fastprompt gradcam photos/ --model RN50 --prompt sweeps/pets/coop-run --prompt sweeps/pets/prograd-run --out fig2.png

  fastprompt gradcam shapes/test --model fastprompt-tiny --checkpoint tiny.pt --cache shapes --class circle --out c.png
"""


@app.command("gradcam", help=HELP, no_args_is_help=True)
def gradcam_command(
    images: Annotated[list[Path], typer.Argument(help="Image files, or folders of images (12 images at most).")],
    out: Annotated[Path, typer.Option("--out", help="The figure file to write (.png, .pdf, .svg or .jpg).")],
    model: Annotated[str, typer.Option(help="open_clip model name the prompts were trained with.")],
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="Pretrained tag or checkpoint file ('none': the seeded random weights of `fastprompt "
            "cache --pretrained none`); default openai."
        ),  # fmt: skip
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="A local checkpoint file (instead of --pretrained).")] = None,
    prompt: Annotated[
        list[Path] | None, typer.Option(help="A run folder of `fastprompt train`; repeat for up to 4 prompts.")
    ] = None,
    zeroshot: Annotated[bool, typer.Option("--zeroshot/--no-zeroshot", help="Show zero-shot CLIP's column.")] = True,
    classname: Annotated[
        str | None, typer.Option("--class", help="The true class of every image (the map explains it).")
    ] = None,
    cache: Annotated[
        Path | None, typer.Option(help="Feature cache for the class names (default: the first prompt's cache).")
    ] = None,
    quick_gelu: Annotated[
        bool | None,
        typer.Option(
            "--quick-gelu/--no-quick-gelu",
            help="Build the QuickGELU network (OpenAI-trained weights) or the GELU one, for a plain checkpoint "
            "(docs/models.md).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    from fastprompt.env import check_device
    from fastprompt.gradcam import gradcam_figure

    check_device(device)
    figure = gradcam_figure(
        images, out, model, pretrained=pretrained, checkpoint=checkpoint, prompts=prompt or [], cache=cache,
        zeroshot=zeroshot, classname=classname, quick_gelu=quick_gelu, device=device,
    )  # fmt: skip
    typer.echo(f"Grad-CAM of {len(figure.heads)} column(s) on {len(figure.images)} image(s) written to {figure.path}")
