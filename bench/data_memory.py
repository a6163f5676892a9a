"""Peak memory and time of `rlhf data prepare` on a large MovieLens-format file, no --max-users.

    python bench/data_memory.py [--rows 5000000] [--users 40000] [--items 5000] [--keep DIR]

Writes a synthetic ratings.csv / movies.csv of the MovieLens latest/25M layout (Zipf-popular items,
timestamps, half-star ratings), then runs the data stage on all of it in a child process and prints that
child's peak resident memory (os.wait4), the seconds taken and bytes per interaction, so growth with
the file can be read off two sizes. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import run_child


def write_movielens(folder: Path, rows: int, users: int, items: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    genres = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi", "Romance", "Thriller", "Animation"]
    with open(folder / "movies.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["movieId", "title", "genres"])
        for i in range(1, items + 1):
            g = rng.choice(genres, size=2, replace=False)
            w.writerow([i, f"Synthetic Film {i} ({1950 + i % 70})", "|".join(g)])
    weights = 1.0 / np.arange(1, items + 1) ** 0.8
    weights /= weights.sum()
    with open(folder / "ratings.csv", "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        chunk = 1_000_000
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            u = rng.integers(1, users + 1, n)
            it = rng.choice(items, size=n, p=weights) + 1
            r = rng.integers(1, 11, n) / 2
            ts = rng.integers(1_000_000_000, 1_600_000_000, n)
            f.write("".join(f"{a},{b},{c},{d}\n" for a, b, c, d in zip(u, it, r, ts)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--users", type=int, default=40_000)
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--keep", help="write the files here and keep them")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.keep) if args.keep else Path(tmp) / "ml"
        t0 = time.time()
        if not (src / "ratings.csv").exists():
            write_movielens(src, args.rows, args.users, args.items)
        gen_s = time.time() - t0
        t0 = time.time()
        proc, peak = run_child(
            [
                sys.executable,
                "-m",
                "rlhf",
                "data",
                "prepare",
                "--source",
                "movielens",
                "--path",
                str(src),
                "--out",
                str(Path(tmp) / "run"),
                "--model",
                "smollm2-135m",
                "data.k=5",
            ]
        )
        secs = time.time() - t0
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        summary = json.loads((Path(tmp) / "run" / "data" / "summary.json").read_text())
    size = (src / "ratings.csv").stat().st_size if args.keep else None
    print(
        f"machine: {os.cpu_count()} CPUs; synthetic MovieLens: {args.rows:,} rows, {args.users:,} users, "
        f"{args.items:,} items (written in {gen_s:.0f} s{f', {size / 1e6:.0f} MB' if size else ''})"
    )
    print(
        f"data prepare: {secs:.0f} s, peak RSS {peak:.2f} GB = {peak * 1e9 / max(args.rows, 1):.0f} bytes/row; "
        f"kept {summary['interactions']:,} interactions of {summary['users']:,} users; rows {summary['rows']}"
    )


if __name__ == "__main__":
    main()
