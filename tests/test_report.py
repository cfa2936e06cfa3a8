"""`fastprompt report`: the tables of a small hand-written sweep folder, the figures, the CLI and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastprompt.cli.app import load_commands
from typer.testing import CliRunner

from fastprompt.errors import FastPromptError
from fastprompt.report import PAPER_DATASETS, build_report

DATA = Path(__file__).parent / "data"
SWEEP = DATA / "report_sweep"
PNG = b"\x89PNG\r\n\x1a\n"


def test_report_reproduces_the_hand_computed_tables(tmp_path):
    result = build_report(SWEEP, tmp_path, plots=False)
    assert result.markdown == (DATA / "report_expected.md").read_text()
    assert (tmp_path / "report.md").read_text() == result.markdown
    assert result.plot_paths == []
    rows = result.csv_path.read_text().splitlines()
    assert rows[0] == "setting,dataset,method,shots,metric,mean,std,n,source"
    assert "fewshot,Average,ProGrad,4,accuracy,77.25,0.5,2,sweep" in rows
    # H from the seed-mean base (87) and new (78) accuracies, 82.25; the mean of the runs' own H (80, 84) would be 82.
    assert "base2new,OxfordPets,CoOp,16,H,82.2545,,2,sweep" in rows


def test_harmonic_mean_of_seed_means_and_of_the_averaged_base_and_new(tmp_path):
    """PROTOCOL.md section 5: H per dataset from the seed-mean B and N; the average row's H from the averaged B and N.
    The runs' own per-seed H (in every record) must not be averaged instead: the numbers make all the ways differ."""
    accuracies = {("A", 1): (90.0, 50.0), ("A", 2): (70.0, 70.0), ("B", 1): (60.0, 90.0), ("B", 2): (80.0, 40.0)}
    lines = []
    for (dataset, seed), (base, new) in accuracies.items():
        run_id = f"coop-{dataset}-base2new-4shot-seed{seed}"
        lines.append(
            {"run_id": run_id, "path": run_id, "status": "done", "method": "coop", "dataset": dataset,
             "setting": "base2new", "shots": 4, "seed": seed, "lambda": 1.0, "alpha": 1.0, "accuracy": base,
             "base_accuracy": base, "new_accuracy": new, "harmonic_mean": 2 * base * new / (base + new)}
        )  # fmt: skip
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = build_report(tmp_path, plots=False)
    markdown = result.markdown
    # A: B 80, N 60 -> H 68.57 (mean of the per-seed H 64.29 and 70.00: 67.14).
    assert "| CoOp | 4 | 80.00 ± 10.00 (n=2) | 60.00 ± 10.00 (n=2) | 68.57 (n=2) |" in markdown.split("new: A")[1]
    # B: B 70, N 65 -> H 67.41 (mean of the per-seed H 72.00 and 53.33: 62.67).
    assert "| CoOp | 4 | 70.00 ± 10.00 (n=2) | 65.00 ± 25.00 (n=2) | 67.41 (n=2) |" in markdown.split("new: B")[1]
    # Average: B 75, N 62.5 -> H 68.18 (mean of the dataset H: 67.99; mean of all per-seed H: 64.90).
    average = markdown.split("Average over datasets (2)")[1]
    assert "| CoOp | 4 | 75.00 ± 0.00 (n=2) | 62.50 ± 7.50 (n=2) | 68.18 (n=2) |" in average
    rows = result.csv_path.read_text().splitlines()
    assert "base2new,Average,CoOp,4,H,68.1818,,2,sweep" in rows

    from fastprompt.train.results import summary_table

    table = summary_table(lines, key="harmonic_mean")
    assert "| A | base2new | coop | 68.57 (n=2) |" in table and "| B | base2new | coop | 67.41 (n=2) |" in table


def test_plots_are_png_files(tmp_path):
    result = build_report(SWEEP, tmp_path)
    names = sorted(path.name for path in result.plot_paths)
    assert names == [
        "accuracy_vs_epoch_OxfordPets.png",
        "accuracy_vs_shots_EuroSAT.png",
        "accuracy_vs_shots_OxfordPets.png",
        "angle_vs_epoch_OxfordPets.png",  # EuroSAT logs nothing per epoch: no epoch figures
    ]
    for path in result.plot_paths:
        assert path.parent == tmp_path
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_paper_reference_rows_for_the_eleven_datasets(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    lines = []
    for i, dataset in enumerate(PAPER_DATASETS):
        for seed in (1, 2, 3):
            for method in ("zeroshot", "coop"):
                run_id = f"{method}-{dataset}-16shot-seed{seed}"
                lines.append(
                    {
                        "run_id": run_id,
                        "path": run_id,
                        "status": "done",
                        "method": method,
                        "dataset": dataset,
                        "setting": "fewshot",
                        "shots": 16,
                        "seed": seed,
                        "lambda": 1.0,
                        "alpha": 1.0,
                        "accuracy": 50.0 + i + seed + (10 if method == "coop" else 0),
                    }  # fmt: skip
                )
    (sweep / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    markdown = build_report(sweep, plots=False).markdown
    assert (sweep / "report" / "report.md").exists()
    assert "| Zero-shot CLIP (paper) | 85.77 |" in markdown.split("## Few-shot: OxfordPets")[1]
    average = markdown.split("Average over datasets (11)")[1]
    assert "| CoOp | 67.00 ± 0.82 |" in average  # 60 + mean(0..10) + mean(1, 2, 3)
    assert "| CoOp (paper) | 73.49 |" in average
    assert "| Zero-shot CLIP (paper) | 58.77 |" in average and "| ProGrad++ (paper) | 75.03 |" in average

    # Not the paper's 11 datasets: no reference rows.
    shutil.copy(SWEEP / "results.jsonl", tmp_path / "results.jsonl")
    assert "(paper)" not in build_report(tmp_path, tmp_path / "out", plots=False).markdown


def test_errors_for_unusable_folders(tmp_path):
    for folder, words in ((tmp_path / "missing", "does not exist"), (tmp_path, "no results.jsonl")):
        try:
            build_report(folder)
        except FastPromptError as error:
            assert words in str(error)
        else:
            raise AssertionError("expected a FastPromptError")
    (tmp_path / "results.jsonl").write_text(
        json.dumps({"run_id": "a", "method": "coop", "dataset": "EuroSAT", "status": "failed", "accuracy": None})
        + "\n{torn"
    )
    try:
        build_report(tmp_path)
    except FastPromptError as error:
        assert "no finished runs" in str(error)
    else:
        raise AssertionError("expected a FastPromptError")


def test_cli_prints_the_tables_and_plot_paths(tmp_path):
    result = CliRunner().invoke(load_commands(), ["report", str(SWEEP), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "| CoOp | 81.00 ± 1.00 (n=2) | 87.00 ± 0.82 |" in result.output
    assert "angle_vs_epoch_OxfordPets.png" in result.output
    result = CliRunner().invoke(load_commands(), ["report", str(SWEEP), "--out", str(tmp_path / "b"), "--no-plots"])
    assert result.exit_code == 0 and not list((tmp_path / "b").glob("*.png"))


def test_cli_missing_folder_is_one_sentence(tmp_path):
    result = CliRunner().invoke(load_commands(), ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    message = result.output.strip()
    assert message.startswith("Error:") and "does not exist" in message and len(message.splitlines()) == 1
