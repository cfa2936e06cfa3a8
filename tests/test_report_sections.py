"""`fastprompt report` in the paper's layout: each section's numbers against a plain computation on synthetic sweep
folders written here (results.jsonl lines, run folders with result.json, log.jsonl and predictions.npz), the note on
skipped sections, the leaderboard, unknown methods, and the one-way imports of the report's modules."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
from fastprompt.cli.app import load_commands
from typer.testing import CliRunner

from fastprompt.report import build_report

PNG = b"\x89PNG\r\n\x1a\n"


class Sweep:
    """A sweep folder written by hand: one results.jsonl line and one run folder per `add`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.records: list[dict] = []

    def add(self, method, dataset, shots, seed, accuracy, log=None, predictions=None, **fields) -> dict:
        run_id = f"{method.replace('+', '-')}-{dataset}-{shots}shot-seed{seed}-{len(self.records):03d}"
        record = {"run_id": run_id, "path": run_id, "status": "done", "method": method, "dataset": dataset,
                  "setting": "fewshot", "shots": shots, "seed": seed, "lambda": 1.0, "alpha": 1.0,
                  "accuracy": float(accuracy)} | fields  # fmt: skip
        folder = self.root / run_id
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({"run_id": run_id, "status": "done"}))
        if log is not None:
            (folder / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
        if predictions is not None:
            np.savez(folder / "predictions.npz", **{k: np.asarray(v, dtype=np.int16) for k, v in predictions.items()})
        self.records.append(record)
        return record

    def report(self, **options):
        (self.root / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.records))
        return build_report(self.root, self.root.parent / f"{self.root.name}-report", **options)


def cell(values) -> str:
    """A table cell computed plainly: mean ± population std, "(n=k)" under 3 values."""
    text = f"{statistics.fmean(values):.2f} ± {statistics.pstdev(values) if len(values) > 1 else 0.0:.2f}"
    return text + (f" (n={len(values)})" if len(values) < 3 else "")


def section(markdown: str, title: str) -> str:
    """The text of the section `## title`, up to the next section."""
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def noisy(rng, labels, error_rate, classes):
    predictions = labels.copy()
    flip = rng.random(labels.size) < error_rate
    predictions[flip] = (labels[flip] + rng.integers(1, classes, int(flip.sum()))) % classes
    return predictions


def test_failure_cases_match_numpy(tmp_path):
    """Figure 5: shares of test images ProGrad gets wrong and CoOp right (and the reverse) per seed, and zero-shot's
    errors among them, against numpy on the same arrays; runs without predictions.npz are named in a note."""
    rng = np.random.default_rng()
    sweep = Sweep(tmp_path / "sweep")
    classes, size = 7, 300
    labels = rng.integers(0, classes, size)
    new_labels = rng.integers(0, classes, size // 2)
    zero = noisy(rng, labels, 0.4, classes)
    zero_new = noisy(rng, new_labels, 0.4, classes)
    sweep.add("zeroshot", "Pets", 4, 1, 60.0, predictions={"predictions": zero, "labels": labels})
    arrays = {}
    for seed in (1, 2):
        for method, rate in (("coop", 0.3), ("prograd", 0.25)):
            arrays[(method, seed)] = noisy(rng, labels, rate, classes)
            accuracy = 100 * (arrays[(method, seed)] == labels).mean()
            sweep.add(method, "Pets", 4, seed, accuracy, predictions={"predictions": arrays[(method, seed)],
                                                                     "labels": labels})  # fmt: skip
    lost = [sweep.add(method, "Pets", 4, 3, 50.0)["run_id"] for method in ("coop", "prograd")]
    # base-to-new: the new classes' arrays beside the base ones
    sweep.add("zeroshot", "Pets", 4, 1, 60.0, setting="base2new", base_accuracy=60.0, new_accuracy=55.0,
              predictions={"predictions": zero, "labels": labels, "new_predictions": zero_new,
                           "new_labels": new_labels})  # fmt: skip
    new = {}
    for method, rate in (("coop", 0.5), ("prograd", 0.3)):
        new[method] = noisy(rng, new_labels, rate, classes)
        sweep.add(method, "Pets", 4, 1, 70.0, setting="base2new", base_accuracy=70.0, new_accuracy=50.0,
                  predictions={"predictions": arrays[(method, 1)], "labels": labels, "new_predictions": new[method],
                               "new_labels": new_labels})  # fmt: skip
    other_labels = (labels + 1) % classes  # another test split: the pair is left out, with a note
    sweep.add("coop", "Cars", 4, 1, 50.0, predictions={"predictions": labels, "labels": labels})
    sweep.add("prograd", "Cars", 4, 1, 50.0, predictions={"predictions": labels, "labels": other_labels})
    result = sweep.report(plots=False)
    table = section(result.markdown, "Figure 5: failure cases")
    assert (
        "Pairs left out: ProGrad vs CoOp on Cars (test, 4 shots, seed 1): different test labels." in table
        and "| Cars |" not in table
    )

    def expected(pairs, labels, zero):
        worse = [(p != labels) & (c == labels) for p, c in pairs]
        better = [(c != labels) & (p == labels) for p, c in pairs]
        columns = []
        for masks in (worse, better):
            columns.append(cell([100 * m.mean() for m in masks]))
            wrong = sum(int((m & (zero != labels)).sum()) for m in masks)
            total = sum(int(m.sum()) for m in masks)
            columns.append(f"{100 * wrong / total:.1f}% ({wrong}/{total})")
        return " | ".join(columns)

    pairs = [(arrays[("prograd", s)], arrays[("coop", s)]) for s in (1, 2)]
    assert f"| Pets | ProGrad vs CoOp | test | 4 | 2 | {expected(pairs, labels, zero)} |" in table
    new_row = expected([(new["prograd"], new["coop"])], new_labels, zero_new)
    assert f"| Pets | ProGrad vs CoOp | new | 4 | 1 | {new_row} |" in table
    assert f"Skipped 2 run(s) without a readable predictions.npz: {', '.join(sorted(lost))}." in table
    assert "Figure 5 (failure cases)" not in result.skipped


def test_leaderboard_means_stds_time_per_run_and_unknown_methods(tmp_path):
    rng = np.random.default_rng()
    sweep = Sweep(tmp_path / "sweep")
    accuracies, seconds = {}, {}
    methods = {"coop": 4, "prograd": 4, "tip_adapter_f": 1, "newer_method": 1}  # runs trained together
    for dataset in ("A", "B"):
        for seed in (1, 2, 3):
            accuracies[("zeroshot", dataset, 1, seed)] = rng.uniform(10, 30)  # below every trained method
            sweep.add("zeroshot", dataset, 1, seed, accuracies[("zeroshot", dataset, 1, seed)])
            for method, group in methods.items():
                if method == "newer_method" and dataset == "B":
                    continue  # a method of a newer version, on one dataset only
                for shots in (1, 4):
                    key = (method, dataset, shots, seed)
                    accuracies[key] = rng.uniform(40, 90)
                    seconds[key] = rng.uniform(1, 100)
                    machine = "cuda:0 NVIDIA H200" if method == "tip_adapter_f" else "cpu"
                    sweep.add(method, dataset, shots, seed, accuracies[key], train_seconds=seconds[key],
                              group_runs=group, machine=machine)  # fmt: skip
    result = sweep.report(plots=False)
    board = section(result.markdown, "Leaderboard")

    def average(method, shots, datasets=("A", "B")):
        return [statistics.fmean(accuracies[(method, d, shots, s)] for d in datasets) for s in (1, 2, 3)]

    complete = ("coop", "prograd", "tip_adapter_f")
    order = sorted(complete, key=lambda m: -statistics.fmean(average(m, 4)))
    labels = {"coop": "CoOp", "prograd": "ProGrad", "tip_adapter_f": "Tip-Adapter-F"}
    for rank, method in enumerate(order, start=1):
        assert f"| {labels[method]} | {rank} | {cell(average(method, 1))} | {cell(average(method, 4))} |" in board
    zero = [statistics.fmean(accuracies[("zeroshot", d, 1, s)] for d in ("A", "B")) for s in (1, 2, 3)]
    assert f"| Zero-shot CLIP | 4 | {cell(zero)} | {cell(zero)} |" in board
    newer = [cell(average("newer_method", s, ("A",))) + " [1/2 datasets]" for s in (1, 4)]
    assert f"| newer_method | 5 | {newer[0]} | {newer[1]} |" in board  # incomplete: ranked last, by its own name
    fewshot = section(result.markdown, "Few-shot: A")
    assert fewshot.index("| Tip-Adapter-F |") < fewshot.index("| newer_method |")  # after every declared method

    for method, group in methods.items():
        datasets = ("A",) if method == "newer_method" else ("A", "B")
        machine = "cuda:0 NVIDIA H200" if method == "tip_adapter_f" else "cpu"
        row = [labels.get(method, method), machine]
        for shots in (1, 4):
            per_run = [seconds[(method, d, shots, s)] / group for d in datasets for s in (1, 2, 3)]
            row.append(f"{statistics.fmean(per_run):.2f} ± {statistics.pstdev(per_run):.2f} (runs={len(per_run)})")
        assert "| " + " | ".join(row) + " |" in board
    csv_rows = result.csv_path.read_text().splitlines()
    coop = average("coop", 4)
    expected = f"leaderboard,Average,CoOp,4,accuracy,{round(statistics.fmean(coop), 4)}"
    assert any(line.startswith(expected) for line in csv_rows)

    # Without timings the report depends on the results only.
    quiet = build_report(sweep.root, tmp_path / "quiet", plots=False, timings=False).markdown
    assert "s / run" not in quiet and "s / run" in result.markdown

    command = ["report", str(sweep.root), "--out", str(tmp_path / "cli"), "--no-plots", "--no-timings"]
    printed = CliRunner().invoke(load_commands(), command)
    assert printed.exit_code == 0 and "## Leaderboard" in printed.output and "s / run" not in printed.output

    # Skipped sections: one line naming each missing section and the runs it needs.
    notes = [line for line in result.markdown.splitlines() if line.startswith("Not in this sweep:")]
    assert len(notes) == 1 and "Table 5 (KD): needs runs of KD" in notes[0] and "Figure 4" not in notes[0]
    for name in ("Table 2 (domain generalisation)", "Table 3 (base-to-new)", "Figure 6 (angles)", "Figure 7"):
        assert name in notes[0]
    assert "Table 5 (KD)" in result.skipped and "Leaderboard" not in result.skipped


def test_kd_cosine_and_lambda_tables(tmp_path):
    """Tables 5, 6 and 7: methods chosen by their declarations, averaged over the datasets that have them."""
    rng = np.random.default_rng()
    sweep = Sweep(tmp_path / "sweep")
    acc = {}
    for dataset in ("A", "B"):
        for seed in (1, 2):
            runs = [("kd", {"alpha": 0.5}), ("kd", {"alpha": 2.0}), ("prograd", {}), ("cosine", {}),
                    ("cosine+prograd", {})] + ([("prograd", {"lambda": 0.5})] if dataset == "A" else [])  # fmt: skip
            for method, fields in runs:
                key = (method, fields.get("alpha", fields.get("lambda")), dataset, seed)
                acc[key] = rng.uniform(40, 90)
                sweep.add(method, dataset, 4, seed, acc[key], **fields)
            sweep.add("coop", dataset, 4, seed, 50.0)  # not in Tables 5 to 7
    markdown = sweep.report(plots=False).markdown

    def mean(method, knob, datasets=("A", "B")):
        return cell([statistics.fmean(acc[(method, knob, d, s)] for d in datasets) for s in (1, 2)])

    kd = section(markdown, "Table 5: knowledge distillation vs. ProGrad")
    assert f"| KD (α=0.5) | {mean('kd', 0.5)} |" in kd and f"| KD (α=2) | {mean('kd', 2.0)} |" in kd
    # ProGrad at two lambdas on A: one row per lambda, the lambda-0.5 row from A alone.
    assert f"| ProGrad | {mean('prograd', None)} |" in kd
    assert f"| ProGrad (λ=0.5) | {mean('prograd', 0.5, ('A',))} [1/2 datasets] |" in kd
    assert "CoOp" not in kd
    cosine = section(markdown, "Table 6: cosine classifier with and without ProGrad")
    assert f"| Cosine classifier | {mean('cosine', None)} |" in cosine
    assert f"| Cosine classifier + ProGrad | {mean('cosine+prograd', None)} |" in cosine
    lam = section(markdown, "Table 7: the strength λ of the projection")
    assert "Mean over 1 dataset(s) (A)" in lam
    assert f"| ProGrad (λ=0.5) | {mean('prograd', 0.5, ('A',))} |" in lam
    assert f"| ProGrad (λ=1) | {mean('prograd', None, ('A',))} |" in lam


def test_augmentation_teacher_and_angles_for_every_method(tmp_path):
    """Figure 1 (c, d), Figure 7 and Figure 6: centre-view and trained-teacher runs stay out of the main tables;
    angles of CoOp and KD runs logged with `angles` sit beside ProGrad's."""
    rng = np.random.default_rng()
    sweep = Sweep(tmp_path / "sweep")
    acc, cosines = {}, {}
    for seed in (1, 2):
        sweep.add("zeroshot", "Pets", 4, seed, 60.0)
        for method, fields in (("coop", {"angles": True}), ("coop", {"augment": False}), ("kd", {"angles": True}),
                               ("prograd", {}), ("prograd", {"teacher": "TEACHER"})):  # fmt: skip
            key = (method, tuple(fields), seed)
            acc[key] = rng.uniform(40, 90)
            cosines[key] = rng.uniform(-0.9, 0.9, 3)
            log = [{"epoch": e, "test_accuracy": rng.uniform(40, 90), "cos_mean": c, "conflict_fraction": 0.5}
                   for e, c in enumerate(cosines[key])]  # fmt: skip
            if fields.get("teacher"):
                teacher = next(r for r in sweep.records if r["method"] == "coop" and r["seed"] == seed)
                fields = {"teacher": str(Path("elsewhere") / teacher["run_id"])}  # a folder path: matched by name
            sweep.add(method, "Pets", 4, seed, acc[key], log=log, **fields)
    result = sweep.report()

    def values(method, fields):
        return cell([acc[(method, fields, s)] for s in (1, 2)])

    fewshot = section(result.markdown, "Few-shot: Pets")
    assert f"| CoOp | {values('coop', ('angles',))} |" in fewshot
    assert f"| ProGrad | {values('prograd', ())} |" in fewshot and "teacher" not in fewshot
    assert "centre view" not in fewshot
    augmentation = section(result.markdown, "Figure 1 (c, d): with and without augmentation")
    assert f"| CoOp (augmented) | {values('coop', ('angles',))} |" in augmentation
    assert f"| CoOp (centre view) | {values('coop', ('augment',))} |" in augmentation
    assert "| Zero-shot CLIP | 60.00 ± 0.00 (n=2) |" in augmentation and "KD" not in augmentation
    teacher = section(result.markdown, "Figure 7: a trained prompt as the teacher")
    assert f"| ProGrad (template teacher) | {values('prograd', ())} |" in teacher
    assert f"| ProGrad (trained teacher) | {values('prograd', ('teacher',))} |" in teacher
    assert f"| CoOp (the teachers) | {values('coop', ('angles',))} |" in teacher

    angles = section(result.markdown, "Figure 6: angle between G_d and G_g")
    for label, key in (
        ("CoOp", ("coop", ("angles",))),
        ("KD (α=1)", ("kd", ("angles",))),
        ("ProGrad", ("prograd", ())),
    ):
        degrees = [[math.degrees(math.acos(c)) for c in cosines[(*key, s)]] for s in (1, 2)]
        first, last = cell([d[0] for d in degrees]), cell([d[-1] for d in degrees])
        assert f"| Pets | {label} | 4 | {first} | {last} | {cell([statistics.fmean(d) for d in degrees])} |" in angles
    assert "centre view" not in angles and "teacher" not in angles

    names = {path.name for path in result.plot_paths}
    assert {"augmentation_vs_epoch_Pets.png", "angle_vs_epoch_Pets.png", "accuracy_vs_shots_Pets.png"} <= names
    for path in result.plot_paths:
        assert path.read_bytes()[:8] == PNG


def test_domain_generalisation_and_cross_dataset_tables(tmp_path):
    sweep = Sweep(tmp_path / "sweep")
    targets = {}
    for seed in (1, 2):
        targets[seed] = {"ImageNetV2": 50.0 + seed, "ImageNetSketch": 30.0 + seed, "Caltech101": 80.0 + 2 * seed,
                         "DescribableTextures": 40.0 + 4 * seed}  # fmt: skip
        sweep.add("coop", "ImageNet", 4, seed, 60.0 + seed, targets=targets[seed])
    markdown = sweep.report(plots=False).markdown
    shift = section(markdown, "Domain generalisation from ImageNet")
    assert "| Method | Shots | ImageNet (source) | ImageNetSketch | ImageNetV2 |" in shift
    assert "| CoOp | 4 | 61.50 ± 0.50 (n=2) | 31.50 ± 0.50 (n=2) | 51.50 ± 0.50 (n=2) |" in shift
    assert "| Zero-shot CLIP (paper) | – | 58.18 | – | – |" in shift
    transfer = section(markdown, "Transfer from ImageNet")
    assert "| Caltech101 | DescribableTextures | Average (targets) |" in transfer
    average = cell([statistics.fmean([targets[s]["Caltech101"], targets[s]["DescribableTextures"]]) for s in (1, 2)])
    assert f"| CoOp | 4 | 61.50 ± 0.50 (n=2) | 83.00 ± 1.00 (n=2) | 46.00 ± 2.00 (n=2) | {average} |" in transfer
    assert "| Zero-shot CLIP (paper) | – | 58.18 | 86.29 | 42.32 | – |" in transfer
    assert "ImageNetV2" not in transfer


def test_core_and_plots_import_without_the_builder():
    """Imports run one way: the core imports no section, figure or builder; the figures import no builder."""
    script = (
        "import sys\n"
        "import fastprompt.report.core\n"
        "parts = ('fastprompt.report.sections', 'fastprompt.report.plots', 'fastprompt.report.build')\n"
        "assert not [m for m in parts if m in sys.modules], sorted(sys.modules)\n"
        "import fastprompt.report.plots\n"
        "assert 'fastprompt.report.build' not in sys.modules and 'fastprompt.report.sections' not in sys.modules\n"
        "import fastprompt.report.sections\n"
        "assert 'fastprompt.report.build' not in sys.modules\n"
        "from fastprompt.report import build_report\n"
        "assert 'fastprompt.report.build' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
