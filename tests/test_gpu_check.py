"""bench/gpu_check.sh cannot rot: its dry run, its no-GPU exit and its summary run here, and every bench it calls
runs its short mode on the CPU with tiny sizes (in this process: each costs a second or two, not an interpreter)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))  # the benches import `common` as they do when run by path

import bench_cache  # noqa: E402
import bench_memory  # noqa: E402
import bench_prograd_update  # noqa: E402
import bench_train_step  # noqa: E402
import common  # noqa: E402
import gpu_check_parts  # noqa: E402

PARTS = ("tests", "kernel", "train", "cache", "memory", "protocol")


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(BENCH / "gpu_check.sh"), *args], capture_output=True, text=True,
                          env=environment, timeout=600)  # fmt: skip


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_dry_run_resolves_and_parses_every_part(tmp_path):
    out = tmp_path / "out"
    done = run_script("--dry-run", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    for part in PARTS:
        assert f"dry run: part {part} " in done.stdout
    assert done.stdout.count("dry run: ok ") == len(PARTS) and "FAILED" not in done.stdout
    assert "tests/test_gpu.py" in done.stdout, "the GPU tests are found by their marker"
    assert not any(out.iterdir()), "a dry run writes nothing"


def test_without_a_gpu_one_line_and_exit_0(tmp_path):
    out = tmp_path / "out"
    done = run_script(str(out), CUDA_VISIBLE_DEVICES="")  # no GPU visible, also on a machine that has one
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("\n") == 1 and "no CUDA device here" in done.stdout
    assert not any(out.iterdir())


def test_usage_error_exits_2():
    done = run_script()
    assert done.returncode == 2 and "usage: bash bench/gpu_check.sh" in done.stderr


def test_summary_records_failures_and_timeouts(tmp_path, capsys):
    (tmp_path / "memory.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1"/></testsuites>'
    )
    records = tmp_path / "records.tsv"
    records.write_text(
        "tests\t1\t30\t90\tgpu_tests.xml\nmemory\t0\t12\t100\tmemory.csv\ncache\t124\t90\t90\tcache.csv\n"
    )
    assert gpu_check_parts.summary(tmp_path, records, 132.0) == 1
    rows = read_csv(tmp_path / "summary.csv")
    assert [(r["part"], r["status"]) for r in rows] == [("tests", "failed"), ("memory", "passed"),
                                                        ("cache", "timeout"), ("total", "failed")]  # fmt: skip
    assert rows[0]["detail"] == "3 passed, 1 failed, 1 skipped" and rows[1]["detail"] == "2 rows"
    assert "total" in capsys.readouterr().out


def test_bundle_copies_the_pure_python_packages(tmp_path):
    assert gpu_check_parts.main(["bundle", str(tmp_path / "site")]) == 0
    for name in gpu_check_parts.BUNDLE:
        assert (tmp_path / "site" / name / "__init__.py").is_file()
    assert not list((tmp_path / "site").rglob("__pycache__"))
    assert set(gpu_check_parts.BUNDLE) <= set(gpu_check_parts.REQUIRED)


def test_bench_prograd_update_quick_on_cpu(tmp_path, keep_threads):
    out = tmp_path / "update.csv"
    args = ["--quick", "--threads", "1", "--seconds-per-case", "0.01", "--out", str(out)]
    assert bench_prograd_update.main(args) == 0
    rows = read_csv(out)
    assert {r["impl"] for r in rows} == {"ref", "loop", "cpu_fast"} and len(rows) == 6


@pytest.fixture
def keep_threads():
    """The benches set torch's thread count; this test process keeps its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_train_step_tiny_on_cpu(tmp_path, keep_threads):
    out = tmp_path / "train.csv"
    args = ["--model", "fastprompt-tiny", "--classes", "5", "--contexts", "2", "--repeats", "1", "--batch", "2",
            "--threads", "1", "--out", str(out)]  # fmt: skip
    assert bench_train_step.main(args) == 0
    rows = read_csv(out)
    assert [r["variant"] for r in rows] == ["reference_issue", "reference_released", "fastprompt_P2", "image_tower_x1"]
    assert all(float(r["median_s"]) > 0 for r in rows) and "fastprompt-tiny" in rows[2]["note"]
    assert bench_train_step.parse_args(["--device", "cuda"]).device == "cuda"


def test_bench_cache_tiny_on_cpu(tmp_path):
    out = tmp_path / "cache.csv"
    args = ["--images", "4", "--views", "1", "--image-size", "64x48", "--num-workers", "0", "--repeats", "1",
            "--batch-size", "8", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert bench_cache.main(args) == 0
    (row,) = read_csv(out)
    assert float(row["extract_images_per_s"]) > 0 and row["bottleneck"] in ("decode", "encode")


def test_bench_memory_tiny_on_cpu(tmp_path, monkeypatch, keep_threads):
    """The parent's rows from workers run in this process (a real run starts a fresh interpreter per configuration)."""

    real_run = subprocess.run

    def in_process(argv, **kwargs):
        if "--worker" not in argv:  # git, for the rows' commit field
            return real_run(argv, **kwargs)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = bench_memory.main(argv[2:])
        return subprocess.CompletedProcess(argv, code, stdout.getvalue(), "")

    monkeypatch.setattr(bench_memory.subprocess, "run", in_process)
    out = tmp_path / "memory.csv"
    args = ["--model", "fastprompt-tiny", "--classes", "6", "--contexts", "2", "--chunks", "3", "auto=1",
            "--threads", "1", "--predict-contexts", "15", "--out", str(out)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a budget of 1 MiB may be too small even for one class
        assert bench_memory.main(args) == 0
    rows = read_csv(out)
    assert [(r["P"], r["chunk_arg"], r["chunk"], r["status"]) for r in rows] == [
        ("2", "3", "3", "ok"), ("2", "auto=1", "1", "ok"), ("15", "3", "3", "predicted")]  # fmt: skip
    assert float(rows[0]["predicted_mib"]) > 0 and rows[1]["budget_mib"] == "1.0"
    with pytest.raises(SystemExit):
        bench_memory.parse_args(["--chunks", "some"])
    argv = ["python", "bench_memory.py", "--worker", json.dumps([1, "none", "fp32"]), "--model", "fastprompt-tiny",
            "--classes", "4", "--threads", "1"]  # fmt: skip
    worker = json.loads(in_process(argv).stdout)
    assert worker["chunk"] == "none" and worker["status"] == "ok"


def test_builtin_pets_names_match_the_shared_file(clip_prompts):
    assert common.OXFORD_PETS_CLASSNAMES == clip_prompts["OxfordPets"]["classnames"]


def test_tree_imports_without_install(tmp_path):
    """A bare machine gets a copy of the tree and PYTHONPATH=. (gpu_check.sh): kernels/ and cli/ must import as
    fastprompt.kernels and fastprompt.cli without the installed mapping."""
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        f"sys.path.insert(0, {str(ROOT)!r}); import fastprompt.kernels.prograd_update as k, fastprompt.cli as c; "
        "print(k.__file__); print(c.__file__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(ROOT / "kernels" / "prograd_update.py"), str(ROOT / "cli" / "__init__.py")]
