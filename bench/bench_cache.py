"""Throughput of `fastprompt cache` against the pure decode-and-augment rate of the same images.

Three rates on the same generated JPEGs (photo-sized by default, 500 x 375 like OxfordPets):
(a) decode: the DataLoader workers alone (decode once, V augmented views each), images/s;
(b) encode: the image tower alone on ready pixel batches (batch of `--batch-size` views), views/s and images/s;
(c) extract: the whole `build_cache` (decode, augment, encode, write shards), images/s.
If (c) sits near (a), decoding bounds the cache and more `--num-workers` (CPU cores) help; near (b), the encoder does.
Each rate is a wall-clock median over `--repeats` runs; inputs are made before the timed region.
Rows are appended to bench/results/cache_<device>.csv (device, versions, git commit, date).

Usage:
    python bench/bench_cache.py                                   # tiny model on the CPU, small case
    python bench/bench_cache.py --device cuda --images 2000 --views 16 --num-workers 16
    python bench/bench_cache.py --device cuda --model RN50 --images 2000 --num-workers 16   # random RN50 weights
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastprompt.cache.decode import ViewDataset, ViewTask, keep_as_list
from fastprompt.cache.extract import ImageEncoder, build_cache, resolve_precision
from fastprompt.cache.plan import CacheOptions
from fastprompt.clip import load_clip
from fastprompt.data.own import read_image_folder
from fastprompt.data.transforms import ViewTransform

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = [
    "date", "device", "torch", "commit", "model", "precision", "image_size", "images", "views", "batch_size",
    "num_workers", "decode_images_per_s", "encode_views_per_s", "encode_images_per_s", "extract_images_per_s",
    "extract_fraction_of_bound", "bottleneck",
]  # fmt: skip


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "fastprompt/cache", "fastprompt/data", "bench/bench_cache.py"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu {platform.machine()}, {torch.get_num_threads()} thread(s) of {os.cpu_count()}"


def write_images(folder: Path, count: int, width: int, height: int) -> None:
    """Smooth random JPEGs (a photo's compression ratio, unlike noise) in two class folders of `train/`."""
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        path = folder / "train" / f"class_{index % 2}" / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fastprompt-tiny")
    parser.add_argument("--pretrained", default=None, help="tag or checkpoint (default: random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--image-size", default="500x375", help="width x height of the generated JPEGs")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="CSV (default bench/results/cache_<device>.csv)")
    args = parser.parse_args(argv)
    try:
        args.width, args.height = (int(side) for side in args.image_size.lower().split("x"))
    except ValueError:
        parser.error(f"--image-size must be WIDTHxHEIGHT, e.g. 500x375, got '{args.image_size}'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    width, height = args.width, args.height
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")

    torch.manual_seed(0)
    clip = load_clip(args.model, args.pretrained)
    precision = resolve_precision(args.precision, args.device)
    with tempfile.TemporaryDirectory() as scratch:
        data_root = Path(scratch) / "images"
        write_images(data_root, args.images, width, height)
        dataset = read_image_folder(data_root, name="bench")
        transform = ViewTransform.from_preprocess_cfg(clip.preprocess_cfg)
        tasks = [ViewTask(str(item.path), item.key, True, args.views) for item in dataset.train]
        images_per_batch = max(1, args.batch_size // args.views)

        def decode_only() -> None:
            loader = DataLoader(ViewDataset(tasks, transform), batch_size=images_per_batch,
                                num_workers=args.num_workers, collate_fn=keep_as_list)  # fmt: skip
            for _ in loader:
                pass

        encoder = ImageEncoder(clip, args.device, precision)
        pixels = torch.randn(args.batch_size, 3, transform.size, transform.size)
        if args.device.startswith("cuda"):
            pixels = pixels.pin_memory()
        encode_batches = max(1, args.images * args.views // args.batch_size)
        encoder(pixels)  # warm-up (CUDA context, autotuning)

        def encode_only() -> None:
            for _ in range(encode_batches):
                encoder(pixels)

        options = CacheOptions(shots=(), seeds=(), views=args.views, full_train=True, shard_size="256MB")
        runs = iter(range(10**6))

        def extract() -> None:
            out = Path(scratch) / f"cache-{next(runs)}"
            build_cache(dataset, clip, out, options, device=args.device, precision=precision,
                        batch_size=args.batch_size, num_workers=args.num_workers, progress=False)  # fmt: skip

        decode_rate = args.images / median_seconds(decode_only, args.repeats)
        encode_views_rate = encode_batches * args.batch_size / median_seconds(encode_only, args.repeats)
        extract_rate = args.images / median_seconds(extract, args.repeats)

    encode_rate = encode_views_rate / args.views
    bound = min(decode_rate, encode_rate)
    row = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(args.device),
        "torch": torch.__version__,
        "commit": git_commit(),
        "model": args.model,
        "precision": precision,
        "image_size": args.image_size,
        "images": args.images,
        "views": args.views,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "decode_images_per_s": round(decode_rate, 2),
        "encode_views_per_s": round(encode_views_rate, 1),
        "encode_images_per_s": round(encode_rate, 2),
        "extract_images_per_s": round(extract_rate, 2),
        "extract_fraction_of_bound": round(extract_rate / bound, 3),
        "bottleneck": "decode" if decode_rate < encode_rate else "encode",
    }
    out = args.out or RESULTS / f"cache_{'cuda' if args.device.startswith('cuda') else 'cpu'}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    new_file = not out.exists()
    with out.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerow(row)
    for key in FIELDS[5:]:
        print(f"{key:>26}: {row[key]}")
    print(f"appended to {out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
