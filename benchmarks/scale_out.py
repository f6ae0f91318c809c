"""Scale-out on one machine: data-parallel training ranks and search workers, against one process.

1. Training throughput (samples/s) of the project's MobileNetV2 (`zoo:mobilenet_v2`) on synthetic
   images with the toolchain's own `fit` under torchrun: 2 ranks (DistributedDataParallel, gloo, the
   leader's fits replayed by the follower, one thread each) vs 1 process using every core.
   Target: >= 1.5x, at one global batch (64; `fit` gives each rank its share). Shown beside it: one
   process on one thread (the per-core yardstick; on a loaded machine a process with several intra-op
   threads loses more than single-threaded ranks do), 2 ranks at 64 per rank (weak scaling, as
   data-parallel throughput is usually quoted), and the ceiling: 2 independent one-thread trainings at
   once with no communication at all, what the two cores (shared caches and memory bandwidth) give
   any data parallelism here. When the ceiling itself is under the target, no DDP can meet it.
2. Search wall time of the same trials (a grid, so both runs train the same points) with 2
   `toolchain search` workers sharing one SQLite study (one thread each) vs 1 worker using every core,
   from starting the processes to the study having its trials. Target: >= 1.6x.

    python benchmarks/scale_out.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table, target, write_results

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
IMAGE = [3, 32, 32]
BATCH = 64  # the global batch of the training measurement

SEARCH_PROJECT = """
[project]
name = "scale_out"

[model]
entry = "model.py:build_model"
input_shape = [1, 8, 8]
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

[data]
source = "sklearn:digits"

[train]
batch_size = 32

[search]
sampler = "grid"
pruner = "none"
width = [16, 24, 32, 40]
lr = [0.002, 0.004]
epochs = [EPOCHS]
"""


# ----------------------------------------------------------------------------- 1. training ranks


def train_rank(samples: int, epochs: int, out: Path, batch: int) -> None:
    """One rank of the training measurement (run under torchrun, or alone): rank 0 times `fit`."""
    import numpy as np
    import torch

    from toolchain.core.zoo.mobilenet_v2 import mobilenet_v2
    from toolchain.core.metrics import BUILTIN
    from toolchain.training import distributed
    from toolchain.training.fit import fit, follow

    here = distributed.start()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, *IMAGE), dtype=np.float32)
    y = rng.integers(0, 10, samples).astype(np.int64)
    x_val, y_val = x[:64], y[:64]
    distributed.share_arrays(x_train=x, y_train=y)
    if not here.leader:
        while (job := distributed.receive(None)) is not None:
            follow(job)
        return
    torch.manual_seed(0)
    module = mobilenet_v2(IMAGE, 10, width_mult=0.5, last_channels=256)
    fit(module, x, y, x_val, y_val, metric=BUILTIN["accuracy"], lr=1e-3, weight_decay=0.0, batch_size=batch,
        max_epochs=1, patience=10, seed=0, label="warm-up")  # first-touch costs (allocations, gloo's buffers)
    started = time.perf_counter()
    fit(module, x, y, x_val, y_val, metric=BUILTIN["accuracy"], lr=1e-3, weight_decay=0.0, batch_size=batch,
        max_epochs=epochs, patience=epochs + 1, seed=0, label="measured")
    seconds = time.perf_counter() - started
    distributed.send_done()
    out.write_text(json.dumps({"seconds": seconds, "samples_per_s": samples * epochs / seconds,
                               "threads": torch.get_num_threads(), "ranks": here.size}))


def _rank_command(samples: int, epochs: int, out: Path, batch: int = BATCH) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--train-rank", str(samples), str(epochs), str(out), str(batch)]


def _threads_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}


def measure_training(ranks: int, samples: int, epochs: int, folder: Path, threads: int | None = None,
                     batch: int = BATCH) -> dict:
    """`batch` is the global batch (`fit` splits it across ranks)."""
    out = folder / f"train-{ranks}-{threads}-{batch}.json"
    command = _rank_command(samples, epochs, out, batch)
    threads = threads or max(1, (os.cpu_count() or 1) // ranks)
    if ranks > 1:
        command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    subprocess.run(command, check=True, env=_threads_env(threads), cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def measure_ceiling(copies: int, samples: int, epochs: int, folder: Path) -> dict:
    """`copies` independent one-thread trainings at once, no communication: what the cores give data parallelism
    at best (shared memory bandwidth and caches included), the yardstick for the ranks' own overhead."""
    outs = [folder / f"alone-{copy}.json" for copy in range(copies)]
    running = [subprocess.Popen(_rank_command(samples, epochs, out), env=_threads_env(1), cwd=REPO,
                                stdout=subprocess.DEVNULL) for out in outs]
    if any(p.wait() for p in running):
        raise SystemExit("an independent training process failed")
    results = [json.loads(out.read_text()) for out in outs]
    return {"seconds": max(r["seconds"] for r in results), "samples_per_s": sum(r["samples_per_s"] for r in results),
            "threads": 1}


# ----------------------------------------------------------------------------- 2. search workers


def measure_search(workers: int, epochs: int, folder: Path) -> dict:
    project = folder / f"search-{workers}"
    project.mkdir()
    shutil.copy(REPO / "examples" / "digits" / "model.py", project)
    (project / "toolchain.toml").write_text(SEARCH_PROJECT.replace("EPOCHS", str(epochs)))
    storage = f"sqlite:///{project / 'study.sqlite'}"
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // workers))}
    command = [str(BIN / "toolchain"), "search", "--target", "jetson", "--config", str(project / "toolchain.toml"),
               "--storage", storage]
    started = time.perf_counter()
    running = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(workers)]
    answers = [p.communicate() for p in running]
    seconds = time.perf_counter() - started
    if any(p.returncode for p in running):
        raise SystemExit(f"a search worker failed: {answers}")
    outputs = [stdout for stdout, _ in answers]
    ran = [int(out.split(" ran ")[1].split()[0]) for out in outputs]
    return {"seconds": seconds, "trials_per_worker": ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, epochs and trial epochs (~2 min)")
    parser.add_argument("--train-rank", nargs=4, metavar=("SAMPLES", "EPOCHS", "OUT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_rank:
        train_rank(int(args.train_rank[0]), int(args.train_rank[1]), Path(args.train_rank[2]), int(args.train_rank[3]))
        return
    samples, epochs, trial_epochs = (512, 2, 8) if args.quick else (1024, 3, 15)
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-out-") as tmp:
        folder = Path(tmp)
        train = {ranks: measure_training(ranks, samples, epochs, folder) for ranks in (1, 2)}
        one_thread = measure_training(1, samples, epochs, folder, threads=1)
        weak = measure_training(2, samples, epochs, folder, batch=2 * BATCH)
        ceiling = measure_ceiling(2, samples, epochs, folder)
        model = f"train MobileNetV2 (0.5x, 3x32x32), batch {BATCH}"
        for what, ranks, result in [(model, 1, one_thread), *((model, r, res) for r, res in train.items()),
                                    (f"same, {BATCH} per rank (global {2 * BATCH})", 2, weak),
                                    ("ceiling: 2 independent trainings, no DDP", 2, ceiling)]:
            rows.append({"what": what, "processes": ranks, "threads_each": result["threads"],
                         "seconds": round(result["seconds"], 2), "samples_per_s": round(result["samples_per_s"], 1),
                         "speed-up": round(result["samples_per_s"] / train[1]["samples_per_s"], 3)})
        search = {workers: measure_search(workers, trial_epochs, folder) for workers in (1, 2)}
        for workers, result in search.items():
            rows.append({"what": f"search 8 grid trials ({trial_epochs} epochs)", "processes": workers,
                         "threads_each": max(1, (os.cpu_count() or 1) // workers), "seconds": round(result["seconds"], 2),
                         "trials": "+".join(map(str, result["trials_per_worker"])),
                         "speed-up": round(search[1]["seconds"] / result["seconds"], 3)})
    print_table(rows, ["what", "processes", "threads_each", "seconds", "samples_per_s", "trials", "speed-up"])
    targets = {
        "training throughput, 2 ranks vs 1 process": target(train[2]["samples_per_s"] / train[1]["samples_per_s"], ">=", 1.5),
        "search wall time, 1 worker / 2 workers": target(search[1]["seconds"] / search[2]["seconds"], ">=", 1.6),
    }
    print(f"2 ranks reach {train[2]['samples_per_s'] / ceiling['samples_per_s']:.0%} of the ceiling (2 independent "
          f"trainings; {weak['samples_per_s'] / ceiling['samples_per_s']:.0%} with {BATCH} per rank); the ceiling is "
          f"{ceiling['samples_per_s'] / train[1]['samples_per_s']:.2f}x one process on every core, "
          f"{ceiling['samples_per_s'] / one_thread['samples_per_s']:.2f}x one process on one core")
    load = os.getloadavg()[0]
    print(f"load average over the last minute at the end: {load:.1f} on {os.cpu_count()} cores")
    write_results("scale_out", rows, targets, load_average=round(load, 2), settings={"samples": samples, "epochs": epochs, "trial_epochs": trial_epochs,
                                                        "quick": args.quick})


if __name__ == "__main__":
    main()
