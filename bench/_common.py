"""Helpers the bench scripts share: run a child process and read its own peak memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` from the repo root; return it and that child's peak RSS in GB (os.wait4: this child only).
    Output goes through files, so a chatty child can never block on a full pipe."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()), usage.ru_maxrss / 1024**2


def device() -> str:
    """What the benchmark ran on, for the printed figures: the GPU's name, or the CPU count."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
    return f"CPU only, {os.cpu_count()} CPUs"


def add_dtype_arg(parser) -> None:
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="weights and compute (auto: as model.dtype=auto decides: bfloat16 on a GPU with bf16 or a CPU with AMX / "
        "AVX-512 BF16, float32 elsewhere)",
    )


def resolve_dtype(value: str) -> str:
    """The --dtype value with auto decided for this machine as the stages decide it (rlhf.precision.resolved: bf16 on
    a CUDA device with bf16 or a CPU with AMX / AVX-512 BF16, float32 elsewhere)."""
    if value != "auto":
        return value
    from rlhf.precision import resolved

    return resolved(value)[0]


def scratch_run(source: Path, work: Path, links=("data", "sft", "reward"), copies=()) -> Path:
    """A throwaway run in ``work`` that shares ``source``'s finished stages: ``links`` as symlinks (read only by the
    benchmark), ``copies`` copied (the parts it rewrites; resume records left out), and its resolved config.yaml."""
    work.mkdir(parents=True)
    for part in links:
        (work / part).symlink_to((source / part).resolve())
    for part in copies:
        if (source / part).exists():
            shutil.copytree(source / part, work / part, ignore=shutil.ignore_patterns("checkpoints", "trainer"))
    if (source / "config.yaml").exists():
        shutil.copy(source / "config.yaml", work / "config.yaml")
    return work


def median_time(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after one warm-up call."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
