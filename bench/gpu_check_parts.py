"""The Python side of bench/gpu_check.sh: the environment line, the dry run's argument checks, the summary.

    python bench/gpu_check_parts.py env                       # one line; exit 0 GPU, 4 no GPU, 3 a package missing
    python bench/gpu_check_parts.py validate -- CMD :: CMD    # the env line (no GPU needed), then every part's entry
                                                              # point imported and its arguments parsed
    python bench/gpu_check_parts.py summary OUTDIR RECORDS SECONDS   # summary.csv from the parts' records, printed
    python bench/gpu_check_parts.py bundle [DIR]              # copy the pure-Python packages a bare CUDA image lacks
                                                              # (BUNDLE) from this environment to DIR
                                                              # (default bench/.gpu_check_site, which gpu_check.sh
                                                              # puts on PYTHONPATH when it exists)

A part's command is `bench/<script>.py ARGS...` (its module is imported and its `parse_args(ARGS)` called) or
`-m pytest ARGS...` (collected with --collect-only: the test modules import and at least one test is selected).
"""

from __future__ import annotations

import csv
import importlib.util
import shutil
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import names the parts need, and the pip package that provides each (the GPU machine may lack some).
REQUIRED = {
    "torch": "torch", "numpy": "numpy", "PIL": "pillow", "open_clip": "open_clip_torch", "ftfy": "ftfy",
    "wcwidth": "wcwidth", "safetensors": "safetensors", "yaml": "pyyaml",
    "typer": "typer", "tqdm": "tqdm", "pytest": "pytest", "triton": "triton", "regex": "regex",
}  # fmt: skip
# Pure-Python packages that the project needs and a CUDA image with PyTorch often lacks: `bundle` copies them.
BUNDLE = ("open_clip", "ftfy", "wcwidth")
SITE = ROOT / "bench" / ".gpu_check_site"
EXIT_MISSING, EXIT_NO_GPU = 3, 4
SUMMARY_FIELDS = ["part", "status", "exit_code", "seconds", "budget_s", "output", "detail"]


def environment_line(require_gpu: bool = True) -> int:
    """Print one line about torch, the GPU and missing packages; the exit code says which case holds."""
    try:
        import torch
    except ImportError:
        print(f"gpu_check: {sys.executable} cannot import torch; run with PYTHON=/path/to/python that has it")
        return EXIT_MISSING
    if require_gpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__} sees none): nothing to measure; exit 0")
        return EXIT_NO_GPU
    missing = sorted({package for name, package in REQUIRED.items() if importlib.util.find_spec(name) is None})
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    if missing:
        print(f"gpu_check: {sys.executable} (torch {torch.__version__}, {gpu}) lacks {' '.join(missing)}: install "
              "them (offline: pip install --no-index --target DIR their wheels; then PYTHONPATH=DIR)")  # fmt: skip
        return EXIT_MISSING
    print(f"gpu_check: python {sys.version.split()[0]} at {sys.executable}, torch {torch.__version__}, {gpu}")
    return 0


def split_commands(words: list[str]) -> list[list[str]]:
    commands, current = [], []
    for word in words:
        if word == "::":
            commands.append(current)
            current = []
        else:
            current.append(word)
    return [command for command in [*commands, current] if command]


def validate(commands: list[list[str]]) -> int:
    """Import each part's entry point and parse its arguments without running it; 0 when all are fine."""
    sys.path.insert(0, str(ROOT / "bench"))  # the scripts import `common` as they do when run by path
    failures = 0
    for command in commands:
        label = " ".join(command)
        try:
            if command[:2] == ["-m", "pytest"]:
                import pytest

                args = [a for a in command[2:] if not a.startswith("--junitxml")]
                code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args])
                if code != 0:
                    raise RuntimeError(f"pytest --collect-only exited {int(code)}")
            else:
                script = ROOT / command[0]
                spec = importlib.util.spec_from_file_location(script.stem, script)
                module = importlib.util.module_from_spec(spec)
                sys.modules[script.stem] = module  # as when run by path: dataclasses look their module up
                spec.loader.exec_module(module)
                module.parse_args(command[1:])
        except (Exception, SystemExit) as error:  # noqa: BLE001  (argparse exits; report every part, then fail)
            failures += 1
            print(f"dry run: FAILED {label}: {type(error).__name__}: {error}")
        else:
            print(f"dry run: ok {label}")
    return 1 if failures else 0


def junit_detail(path: Path) -> str:
    """ "N passed, N failed, N skipped" of a junit XML file, or why it cannot be read."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        return f"no junit XML ({type(error).__name__})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    totals = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return f"{passed} passed, {totals['failures'] + totals['errors']} failed, {totals['skipped']} skipped"


def csv_rows(path: Path) -> str:
    try:
        with path.open(newline="") as handle:
            return f"{max(0, sum(1 for _ in csv.reader(handle)) - 1)} rows"
    except OSError:
        return "no CSV"


def summary(outdir: Path, records: Path, total_seconds: float) -> int:
    """Write OUTDIR/summary.csv from the parts' records (tab-separated: part, exit code, seconds, budget, output)
    and print it; 0 when every part passed."""
    rows = []
    for line in records.read_text().splitlines() if records.exists() else []:
        part, code, seconds, budget, output = line.split("\t")
        code_number = int(code)
        status = {0: "passed", 124: "timeout", 137: "timeout"}.get(code_number, "failed")
        path = outdir / output
        detail = junit_detail(path) if output.endswith(".xml") else csv_rows(path)
        rows.append({"part": part, "status": status, "exit_code": code_number, "seconds": seconds,
                     "budget_s": budget, "output": output, "detail": detail})  # fmt: skip
    passed = all(r["status"] == "passed" for r in rows)
    rows.append({"part": "total", "status": "passed" if passed else "failed", "exit_code": "",
                 "seconds": f"{total_seconds:.0f}", "budget_s": "", "output": "", "detail": ""})  # fmt: skip
    with (outdir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    width = max(len(r["part"]) for r in rows)
    print("gpu_check summary:")
    for r in rows:
        budget = f" of {r['budget_s']} s" if r["budget_s"] else ""
        line = (
            f"  {r['part']:<{width}}  {r['status']:<7}  {r['seconds']:>4} s{budget:<10}  {r['output']}  {r['detail']}"
        )
        print(line.rstrip())
    return 0 if rows[-1]["status"] == "passed" else 1


def bundle(target: Path) -> int:
    """Copy BUNDLE's packages (their source, no bytecode) from this environment into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in BUNDLE:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            print(f"bundle: {name} is not installed here")
            return EXIT_MISSING
        source = Path(spec.origin)
        if spec.submodule_search_locations:
            shutil.copytree(source.parent, target / name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
        else:
            shutil.copy2(source, target / source.name)
    size = sum(path.stat().st_size for path in target.rglob("*") if path.is_file())
    print(f"bundle: {', '.join(BUNDLE)} copied to {target} ({size / 2**20:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["env"]:
        return environment_line(require_gpu="--no-gpu-ok" not in argv)
    if argv[:1] == ["validate"]:
        words = argv[2:] if argv[1:2] == ["--"] else argv[1:]
        return environment_line(require_gpu=False) or validate(split_commands(words))
    if argv[:1] == ["summary"] and len(argv) == 4:
        return summary(Path(argv[1]), Path(argv[2]), float(argv[3]))
    if argv[:1] == ["bundle"] and len(argv) <= 2:
        return bundle(Path(argv[1]) if len(argv) == 2 else SITE)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
