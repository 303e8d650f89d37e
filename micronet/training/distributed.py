"""Multi-process training under ``torchrun``: the process group, ranks, batch slices, DDP.

    torchrun --nproc_per_node=N -m micronet.train [overrides]

torchrun starts N processes with ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. :func:`process_group` joins them (gloo on CPU, nccl on CUDA with
``cuda:LOCAL_RANK`` per process) and leaves the group at the end, also on errors. Without those
variables (or with ``WORLD_SIZE=1``) nothing is initialised and every helper here is the identity
of a single process, so single-process runs are unchanged.

Collectives time out after ``MICRONET_DIST_TIMEOUT`` minutes (default 30): if one rank dies, the
others fail instead of waiting forever (torchrun normally stops them sooner).
"""

from __future__ import annotations

import contextlib
import gc
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from micronet.runs.config import ConfigError, MicronetError

T = TypeVar("T")
TIMEOUT_ENV = "MICRONET_DIST_TIMEOUT"


class PeerError(MicronetError):
    """Another rank failed in a step all ranks take together (rank 0's message is attached)."""


def env_world_size() -> int:
    """The world size torchrun announced (``WORLD_SIZE``), 1 when not launched by it."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def active() -> bool:
    """True in a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """True on the process that writes results (rank 0, or the only process)."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``device`` made explicit for this process: ``cuda:LOCAL_RANK`` for CUDA under torchrun."""
    if device.type == "cuda" and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group for the duration of the block; yields this process's device.

    Backend gloo on CPU, nccl on CUDA (after ``torch.cuda.set_device(LOCAL_RANK)``). A no-op for a
    single process. The group is destroyed when the block exits, whatever the reason.
    """
    if env_world_size() <= 1 or not dist.is_available():
        yield device
        return
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        minutes = float(os.environ.get(TIMEOUT_ENV, "30"))
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of minutes") from None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=minutes),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        # DDP wrappers hold reference cycles: ones the caller has dropped (see :func:`unwrap`) are freed
        # here, while the interpreter is alive. Left to interpreter exit, tearing down their process
        # group there aborted ~1 run in 10 ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def _tensor(values: list[float], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A small tensor on the device the backend communicates from (nccl: the current GPU)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.tensor(values, dtype=dtype, device=dev)


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if active():
        dist.barrier()


def check_batch(batch_size: int, n: int) -> None:
    """:class:`ConfigError` unless the global batch splits evenly over ``n`` processes."""
    if batch_size % n:
        raise ConfigError(f"train.batch_size={batch_size} is the global batch and must be divisible by the "
                          f"number of processes ({n})")


def batch_rows(batch_size: int) -> slice:
    """This rank's contiguous rows of a global batch of ``batch_size`` rows (all rows for one process)."""
    check_batch(batch_size, world_size())
    per = batch_size // world_size()
    return slice(rank() * per, (rank() + 1) * per)


def mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (``t`` itself for a single process)."""
    if not active():
        return t
    out = t.detach().to(device=_tensor([0.0]).device, dtype=torch.float64).reshape(1).clone()
    dist.all_reduce(out)
    return (out / world_size()).to(device=t.device, dtype=t.dtype).reshape(t.shape)


def any_rank(value: int) -> int:
    """The largest of an integer over ranks (a flag or signal number seen by any rank)."""
    if not active():
        return value
    t = _tensor([float(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def with_rank_rngs(rng: dict) -> dict:
    """A checkpoint's ``rng`` entry (this process's states) plus, under torchrun, every rank's torch
    (and CUDA) state under ``ranks``, so each rank's dropout stream resumes exactly. A collective."""
    if not active():
        return rng
    return {**rng, "ranks": gather({k: v for k, v in rng.items() if k in ("torch", "cuda")})}


def restore_torch_rng(rng: dict, device: torch.device, seed: int, step: int) -> None:
    """Set this process's torch (and CUDA) RNG from a checkpoint's ``rng`` entry.

    Rank 0 and a single process continue the top-level states; rank r continues ``ranks[r]`` when the
    checkpoint was written by as many processes, else it starts a fresh stream from (seed, r, step).
    """
    ranks, r = rng.get("ranks") or [rng], rank()
    if r and len(ranks) != world_size():
        torch.manual_seed(int(np.random.SeedSequence([seed, r, step]).generate_state(1)[0]))
        return
    mine = ranks[r] if len(ranks) == world_size() else rng
    torch.set_rng_state(mine["torch"].cpu())
    if "cuda" in mine and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"].cpu(), device)


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; its result there, None elsewhere.

    A collective: if ``fn`` fails on rank 0, the error is re-raised there and every other rank
    raises :class:`PeerError` with its message, so no rank waits for one that is gone.
    """
    if not active():
        return fn()
    result, msg = None, [None]
    try:
        if is_main():
            result = fn()
    except BaseException as e:
        msg = [f"{type(e).__name__}: {e}" if not isinstance(e, MicronetError) else str(e)]
        dist.broadcast_object_list(msg, src=0)
        raise
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise PeerError(f"rank 0 failed: {msg[0]}")
    return result


class Objective(nn.Module):
    """A model and its training loss as one module, for :func:`wrap`.

    DDP's ``find_unused_parameters`` only sees the autograd graph of what its module's forward
    returns; the adaptive softmax, the training cache and distillation use parameters outside the
    model's own forward, so the whole loss is computed inside this forward. ``loss_fn(*args)`` must
    use ``model``'s parameters only.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args: Any) -> Any:
        return self.loss_fn(*args)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when distributed, else ``module`` itself.

    ``find_unused_parameters``: a step whose targets (and inputs) miss a whole adaptive-softmax tail
    bin, on some rank or on all, gives that bin's parameters no gradient; DDP then reduces zeros
    for them from that rank, and leaves ``.grad`` as it was (None: the optimizer skips them, as a
    single process would) when no rank used them.
    """
    if not active():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``module`` itself otherwise). Replace a wrapper by it before
    leaving :func:`process_group`, so the wrapper is freed before the group is destroyed."""
    return module.module if isinstance(module, DistributedDataParallel) else module
