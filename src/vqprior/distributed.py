"""Data-parallel training over several processes (`compute.procs`): the stage relaunches itself as that many ranks
with torchrun's launcher, and these helpers give each rank its share of every batch and keep global what must be.

Every helper is a no-op in one process, so the one-process path runs exactly the code it ran before ranks existed.
Rank 0 alone writes files and the MLflow run; every rank runs the collective calls in the same order."""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import uuid
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from .config import ComputeParams
from .errors import ParamsError

# a rank that waits longer than this at a collective call has lost its peers (one died without the launcher noticing)
TIMEOUT = timedelta(minutes=30)


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def _ranks_die_with_launcher() -> None:
    """On Linux, ask the kernel to SIGKILL this rank when its launcher dies (killed by a user, an OOM or a worker's
    end): an orphaned rank would otherwise wait at a collective call for half an hour."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        except (OSError, AttributeError):
            pass


def start(module: str, compute: ComputeParams) -> int | None:
    """Call first in a training stage's main(). In a rank started by torchrun (ours or the user's own), join the
    process group and return None: the stage goes on as that rank. With `procs` > 1 and no launcher yet, run
    `python -m module` as `procs` ranks (what `torchrun --standalone --nproc_per_node procs` does, on 127.0.0.1),
    wait for them and return their exit status (0, or a failed rank's, which has said why on stderr): the caller
    exits with it. Otherwise return None: one process, nothing to do."""
    procs, device, threads = compute.procs, compute.device, compute.threads
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _ranks_die_with_launcher()
        cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        return None
    if procs <= 1:
        return None
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if 0 < gpus < procs:
        raise ParamsError(f"compute.procs is {procs} but {gpus} CUDA GPUs are visible; use at most one process per "
                          "GPU, or compute.device cpu")
    # one rank per core share: torch's default of all cores per rank would oversubscribe the machine
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // procs)))
    if os.path.isdir("/sys/class/net/lo"):  # gloo finds its peers on loopback, whatever the hostname resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # the launcher's own log repeats, as a traceback, the failure the rank has already put in one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=procs, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5)
    print(f"{module.rpartition('.')[2]}: {procs} processes (compute.procs), {os.environ['OMP_NUM_THREADS']} threads each",
          flush=True)
    try:
        elastic_launch(config, sys.executable)("-m", module)
    except ChildFailedError as failure:  # the failing rank has said why on stderr
        codes = [f.exitcode for f in failure.failures.values()]
        return next((c for c in codes if c and c > 0), 1)
    return 0


def finish() -> None:
    """The last call of a rank: wait for rank 0's writes, then leave the group."""
    if world() > 1:
        dist.barrier()
        dist.destroy_process_group()


def share(n: int) -> slice:
    """This rank's contiguous part of n items: the parts tile 0..n in rank order with no item twice, so a batch split
    this way is the one-process batch, and a validation set is counted exactly once."""
    w, r = world(), rank()
    return slice(n * r // w, n * (r + 1) // w)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over ranks, in place (and returned)."""
    if world() > 1:
        dist.all_reduce(t)
    return t


def all_sum_floats(*values: float) -> list[float]:
    """Python floats summed over ranks, in float64."""
    if world() == 1:
        return list(values)
    # NCCL reduces CUDA tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return all_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's `t` on every rank, in place (and returned)."""
    if world() > 1:
        dist.broadcast(t, 0)
    return t


def gather_rows(rows: torch.Tensor) -> torch.Tensor | None:
    """Every rank's rows concatenated in rank order, on rank 0 (None elsewhere); ranks may hold different counts."""
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world())]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    most = int(max(c.item() for c in counts))
    padded = rows.new_zeros(most, *rows.shape[1:])
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)]) if is_main() else None


def decided_once(rows: torch.Tensor, decide: Callable[[torch.Tensor], torch.Tensor], shape: tuple) -> torch.Tensor:
    """`decide` applied once, on rank 0, to all ranks' `rows` (as one process would to the whole batch), and its
    result of `shape` broadcast: a random choice made on each rank would differ between ranks."""
    if world() == 1:
        return decide(rows)
    everything = gather_rows(rows)
    out = decide(everything) if is_main() else rows.new_empty(shape)
    return broadcast(out.contiguous())


def all_gather_object(obj) -> list:
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def sync_model(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (DDP does this once at the start)."""
    if world() > 1:
        for t in model.parameters():
            dist.broadcast(t.data, 0)
    sync_buffers(model)


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers everywhere (batch-norm running statistics are otherwise each rank's own)."""
    if world() > 1:
        for t in model.buffers():
            dist.broadcast(t.data, 0)


def average_gradients(model: torch.nn.Module, weight: float) -> None:
    """Each gradient as the whole batch's: the ranks' gradients of their share's mean loss, weighted by the share's
    fraction of the batch, summed in one flat all-reduce (a parameter without a gradient counts as zeros)."""
    if world() == 1:
        return
    params = [w for w in model.parameters() if w.requires_grad]
    grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).float() * weight
    dist.all_reduce(flat)
    offset = 0
    for w, g in zip(params, grads):
        w.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
