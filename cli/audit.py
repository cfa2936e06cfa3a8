"""`fastprompt audit`: near-duplicate pairs between a cache's training subsets and its test split (docs/audit.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from fastprompt.cli.app import app

from fastprompt.errors import FastPromptError

HELP = (
    "Find near-duplicate images in a feature cache: training images of a few-shot subset whose centre-view feature "
    "has a cosine similarity of at least --threshold with a test image's (a test image leaked into training) or with "
    "another training image of the subset (docs/audit.md).\n\n"
    "With no --shots or --seed every few-shot subset the cache holds is audited; --all-train audits the whole cached "
    "training split instead. Prints the pairs and one summary line per subset (how many pairs, the share of test "
    "images with a near-duplicate among the training images); --out writes every pair as CSV.\n\n"
    "Examples:\n\n"
    "fastprompt audit caches/pets-rn50\n\n"
    "fastprompt audit caches/pets-rn50 --shots 16 --seed 1 --threshold 0.98 --out pets-duplicates.csv\n\n"
    "fastprompt audit caches/mine --all-train --threshold 1"
)


@app.command("audit", help=HELP, no_args_is_help=True)
def audit_command(
    cache: Annotated[Path, typer.Argument(help="Feature cache folder (made by `fastprompt cache`).")],
    threshold: Annotated[
        float, typer.Option(help="Cosine similarity in (0, 1] at or above which two images are near-duplicates.")
    ] = 0.95,
    shots: Annotated[int | None, typer.Option(help="Audit the subsets of this many shots (default: all).")] = None,
    seed: Annotated[int | None, typer.Option(help="Audit the subsets of this seed (default: all).")] = None,
    all_train: Annotated[
        bool, typer.Option(help="Audit the whole cached training split instead of the few-shot subsets.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="CSV file to write every pair to.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Pairs printed per subset (the CSV holds them all).")] = 20,
) -> None:
    from fastprompt.audit import audit_cache, check_csv_path, check_threshold, pairs_table, write_csv
    from fastprompt.cache.loader import FeatureCache

    check_threshold(threshold)
    if out is not None:
        check_csv_path(out)
    if not cache.exists():
        raise FastPromptError(f"Cache folder '{cache}' does not exist; build it with `fastprompt cache`.")
    audits = audit_cache(FeatureCache(cache), threshold, shots=shots, seed=seed, all_train=all_train)
    for line in pairs_table(audits, limit=limit):
        typer.echo(line)
    for audit in audits:
        typer.echo(audit.summary())
    if out is not None:
        write_csv(out, audits)
        typer.echo(f"Wrote {sum(len(audit.pairs) for audit in audits)} pair(s) to {out}")
