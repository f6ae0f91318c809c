"""Data-parallel training across processes (torchrun): one leader runs the build, followers train with it.

`toolchain build --nproc N` (or `torchrun ... -m toolchain build ...` on several machines) starts one
process per rank. Rank 0, the leader, runs the whole build as one process would; the other ranks,
followers, never touch a pass or a file: they load the same data and wait for jobs. Every `fit` the
leader calls (training, search trials, distillation, pruning's and QAT's fine-tuning) is first sent to
the followers (the module and its teacher pickled, the data as names of the arrays every rank already
holds), then all ranks train it together under `DistributedDataParallel`: a `DistributedSampler`
shards every epoch, gradients are averaged, and the leader alone decides each epoch whether it is the
best so far and whether to stop, and broadcasts that, so every rank restores the same epoch and ends
with bit-identical weights. When the build is done the leader sends "done" and the followers exit 0.

So the pipeline needs no distributed branches beyond `fit`: decisions that follow training (gates,
calibration, QAT's range search) are made once, by the leader, on one copy of the model.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Followers wait for the leader's next job while it quantizes and benchmarks; a dead rank is caught by
# torchrun (it stops the others), so this only bounds a leader that hangs.
JOB_TIMEOUT = datetime.timedelta(hours=12)
USER_MODULE_PREFIX = "_toolchain_user_"  # how `core.data.load_python_function` names a user's file


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def spread(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from the variables torchrun sets (one process when they are absent)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    return World(rank=int(env.get("RANK", "0")), size=size, local_rank=int(env.get("LOCAL_RANK", "0")),
                 local_size=int(env.get("LOCAL_WORLD_SIZE", str(size))))


def device() -> torch.device:
    """CUDA when present (each rank of a machine its own GPU), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", world().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def start() -> World:
    """Join the process group (gloo on CPU, nccl on GPU) and share this machine's cores among its ranks."""
    here = world()
    if not here.spread or dist.is_initialized():
        return here
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // here.local_size))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend, timeout=JOB_TIMEOUT)
    return here


# ----------------------------------------------------------------------------- the data every rank holds

_shared: dict[str, np.ndarray] = {}


def share_arrays(**arrays: np.ndarray | None) -> None:
    """Name the arrays every rank loaded alike (the dataset's splits): jobs then send names, not data."""
    _shared.clear()
    _shared.update({name: array for name, array in arrays.items() if array is not None})


def _by_name(array: np.ndarray) -> str | np.ndarray:
    return next((name for name, held in _shared.items() if held is array), array)


def _resolve(item: str | np.ndarray) -> np.ndarray:
    return _shared[item] if isinstance(item, str) else item


# ----------------------------------------------------------------------------- jobs


@dataclass
class FitJob:
    """One `fit` call as the followers replay it: everything but the leader-only metric and callback."""

    label: str
    module: torch.nn.Module
    teacher: torch.nn.Module | None
    arrays: tuple[str | np.ndarray, str | np.ndarray]  # x_train, y_train: a shared array's name, or the array
    settings: dict[str, Any]  # fit's keyword arguments: lr, weight_decay, batch_size, max_epochs, seed, ...

    @property
    def data(self) -> tuple[np.ndarray, np.ndarray]:
        return _resolve(self.arrays[0]), _resolve(self.arrays[1])


def _user_modules(*modules: torch.nn.Module | None) -> list[str]:
    return sorted({type(m).__module__ for root in modules if root is not None for m in root.modules()
                   if type(m).__module__.startswith(USER_MODULE_PREFIX)})


def _broadcast(message: list[Any]) -> list[Any]:
    dist.broadcast_object_list(message, src=0, device=device() if torch.cuda.is_available() else None)
    return message


def send_fit(label: str, module: torch.nn.Module, teacher: torch.nn.Module | None, x_train: np.ndarray,
             y_train: np.ndarray, settings: dict[str, Any]) -> None:
    """Leader: have the followers train this `fit` with it (the module as it is now, before any step)."""
    job = FitJob(label, module, teacher, (_by_name(x_train), _by_name(y_train)), settings)
    _broadcast([_user_modules(module, teacher), pickle.dumps(job)])


def send_done() -> None:
    """Leader: no more training; the followers exit. Every rank leaves the process group (gloo aborts a
    process that exits with it still open), after a barrier: a leader that tore its group down while the
    broadcast was still in flight to a follower was aborted by gloo now and then ("terminate called
    without an active exception", seen in benchmarks/scale_out.py)."""
    if world().spread and dist.is_initialized():
        _broadcast([None, None])
        dist.barrier()
        dist.destroy_process_group()


def receive(local_user_module: str | None) -> FitJob | None:
    """Follower: the leader's next job, or None when it is done. A user model file is imported under a
    name from its path; a leader elsewhere may hold it at another path, so its names are aliased to ours."""
    modules, payload = _broadcast([None, None])
    if payload is None:
        dist.barrier()  # the leader's, in send_done
        dist.destroy_process_group()
        return None
    for name in modules:
        if name not in sys.modules and local_user_module is not None:
            sys.modules[name] = sys.modules[local_user_module]
    return pickle.loads(payload)


def agree(verdict: tuple[bool, bool] | None) -> tuple[bool, bool]:
    """(this epoch is the best so far, stop now): the leader's verdict, the same on every rank."""
    if not world().spread:
        assert verdict is not None
        return verdict
    flags = torch.tensor(verdict if verdict is not None else (False, False), dtype=torch.int32, device=device())
    dist.broadcast(flags, src=0)
    return bool(flags[0]), bool(flags[1])


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP sends them before each forward,
    so after an epoch each rank still holds the statistics of its own last batch; the epoch's weights
    (kept if it is the best) must be one model, the same everywhere."""
    if world().spread:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in order: equal digests are bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def report_weights(label: str, module: torch.nn.Module, best_epoch: int, epochs_run: int) -> None:
    """One stderr line per rank and job, so the ranks' weights can be compared after a run. Written in one
    call with its newline: `print` writes the text and the newline separately, and two ranks sharing the
    terminal (or a pipe) then ran their lines together."""
    here = world()
    sys.stderr.write(f"rank {here.rank}/{here.size}: {label}: best epoch {best_epoch} of {epochs_run}, "
                     f"weights sha256 {weights_digest(module)}\n")
    sys.stderr.flush()


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel when spread (gradients averaged across ranks)."""
    if not world().spread:
        return module
    from torch.nn.parallel import DistributedDataParallel

    here = device()
    return DistributedDataParallel(module, device_ids=[here] if here.type == "cuda" else None)


def shard(n: int, batch_size: int, seed: int):
    """Per-epoch batches of sample indices for this rank: a seeded `DistributedSampler` over `n` samples,
    `batch_size` split across ranks so a step still sees `batch_size` samples in all."""
    from torch.utils.data import DistributedSampler

    here = world()
    sampler = DistributedSampler(range(n), num_replicas=here.size, rank=here.rank, shuffle=True, seed=seed)
    per_rank = max(1, batch_size // here.size)

    def batches(epoch: int):
        sampler.set_epoch(epoch)
        index = torch.tensor(list(sampler))
        for begin in range(0, len(index), per_rank):
            yield index[begin:begin + per_rank]
    return batches


def launch(nproc: int, argv: list[str]) -> int:
    """`toolchain build --nproc N`: the same command (without --nproc) under torchrun on this machine,
    N ranks sharing its cores; returns torchrun's exit status (non-zero when any rank failed)."""
    from toolchain.errors import ToolchainError

    if nproc < 1:
        raise ToolchainError(f"--nproc must be 1 or more, got {nproc}")
    if world().spread:
        raise ToolchainError("--nproc starts torchrun itself; under torchrun, leave --nproc out")
    args, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            args.append(arg)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "toolchain", *args]
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
