"""Where a run executes: torchrun's process group and device, mixed precision, DDP, and sharded data order.

Every task (classification, segmentation, the next one) gets these from here, so a launch behaves the same way
whatever it trains: NCCL on CUDA and gloo on CPU, one autocast factory, a GradScaler only for fp16.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from ..errors import ConfigError, UserError

__all__ = [
    "DIST_TIMEOUT_ENV",
    "DistInfo",
    "ShardSampler",
    "all_reduce_max",
    "all_reduce_mean",
    "autocast",
    "autocast_settings",
    "batches_from_step",
    "cleanup_distributed",
    "dist_timeout",
    "gather_errors",
    "gather_objects",
    "glibc_keep_freed_memory",
    "init_distributed",
    "keep_freed_cpu_memory",
    "wrap_ddp",
]


#: seconds a process waits for the others in a collective before it fails (a rank that died or hangs)
DIST_TIMEOUT_ENV = "INCEPTIONNEXT_DIST_TIMEOUT"
_DEFAULT_DIST_TIMEOUT_S = 1800.0  # generous: an evaluation or a checkpoint write on rank 0 can take minutes


#: set to 0 to leave the C allocator as it is in CPU training (see :func:`keep_freed_cpu_memory`)
KEEP_CPU_MEMORY_ENV = "INCEPTIONNEXT_KEEP_CPU_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h>


def glibc_keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` serve every block from its heap and keep freed memory for reuse, in this process and
    the processes it forks from now on (``mallopt``: ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` at its maximum), as
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` would at start-up. Returns False where the C library is not
    glibc (musl has no ``mallopt``) and nothing changed.

    By default glibc serves every block over 32 MiB with its own ``mmap`` and unmaps it on ``free``, so each large
    activation of an eager CPU step is page-faulted and zero-filled by the kernel again: an InceptionNeXt-A activation
    at 224 px and batch 32 is 64 MiB. With this the blocks are reused, and the process keeps its peak memory until it
    ends, as PyTorch's caching allocator does on a GPU. It affects every model in the process alike; numerics are
    untouched.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int: its largest value means "never trim"
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def keep_freed_cpu_memory() -> bool:
    """What a CPU training launch calls: :func:`glibc_keep_freed_memory` unless ``INCEPTIONNEXT_KEEP_CPU_MEMORY=0``.
    In a photos training run (InceptionNeXt-A, 224 px, batch 32) the kernel's page zeroing was 13% of the CPU time
    without it. Returns whether it applied."""
    if os.environ.get(KEEP_CPU_MEMORY_ENV, "1") == "0":
        return False
    return glibc_keep_freed_memory()


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_timeout() -> timedelta:
    """The process group's timeout: ``INCEPTIONNEXT_DIST_TIMEOUT`` seconds (default 1800).

    A process whose peer was killed or hangs fails after this long instead of waiting forever in a collective, so
    the launch ends and can be resumed from the last checkpoint.
    """
    text = os.environ.get(DIST_TIMEOUT_ENV)
    if text is None:
        return timedelta(seconds=_DEFAULT_DIST_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{DIST_TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return timedelta(seconds=seconds)


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group.

    NCCL on CUDA, gloo on CPU, with :func:`dist_timeout`. Without torchrun this is a single process on ``cuda:0``
    or the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world, timeout=dist_timeout())
    return DistInfo(rank, local, world, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over processes (a flag raised on any rank is raised on all)."""
    values = values.clone()
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order, on every process (``all_gather_object``, a collective); ``[obj]``
    without torch.distributed or with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def gather_errors(error: BaseException | None) -> list[tuple[int, str, bool]]:
    """Every process's failure as ``(rank, message, is a UserError)``, for all to see (a collective).

    A process that fails while the others wait for it in a collective would leave them hanging; exchanging the
    outcome of a phase lets every process stop with the failing one's message. One process: its own failure only.
    """
    mine = None
    if error is not None:
        user = isinstance(error, UserError)  # its message is the whole story; a bug's needs its type
        mine = (str(error) if user else f"{type(error).__name__}: {error}", user)
    return [(rank, *outcome) for rank, outcome in enumerate(gather_objects(mine)) if outcome is not None]


def autocast_settings(device: torch.device, amp: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed). CPU always runs fp32.

    ``auto`` prefers bf16, which needs no loss scaling; fp16 is the fallback on GPUs without bf16.
    """
    if device.type != "cuda" or amp == "fp32":
        return None, False
    if amp == "fp16":
        return torch.float16, True
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The one autocast context of the package: a no-op for fp32 (``dtype=None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``model`` itself in one process, else a DistributedDataParallel of it on this process's device."""
    if not info.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def loader_options(workers: int, device: torch.device, *, persistent: bool, seed: int = 0) -> dict[str, Any]:
    """DataLoader keywords every task uses: pinned memory on CUDA, workers kept alive across epochs where the dataset
    allows it (``persistent``: its samples do not depend on state set between epochs, see
    :class:`~inceptionnext.data.EpochIndices`), and a private generator, so creating a loader or its workers never
    draws from the global RNG (a resumed run would otherwise see other drop-path masks than the uninterrupted one).
    """
    kw: dict[str, Any] = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )
    if workers > 0:
        kw.update(persistent_workers=persistent, prefetch_factor=4)
    return kw


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r takes indices r, r + world, ... (every sample counted once)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def batches_from_step(
    step: int,
    dataset: Dataset,
    sampler: DistributedSampler,
    batch_size: int,
    *,
    seed: int,
    workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
) -> Iterator[Any]:
    """Training batches from optimizer step ``step`` on, pass after pass over ``dataset``, without end.

    For runs counted in steps: pass ``p`` shuffles with ``sampler.set_epoch(p)`` (and ``dataset.set_epoch(p)`` when
    the dataset seeds its augmentation by pass), and a run resumed at step k skips the batches it already took, so it
    sees exactly the batches the uninterrupted run would have. Each pass's loader has its own generator: creating it
    must not draw from the global RNG, or a resumed run would see other drop-path masks than the uninterrupted one.
    """
    steps_per_pass = len(sampler) // batch_size
    if steps_per_pass < 1:
        raise ValueError(f"a pass of {len(sampler)} samples per process gives no batch of {batch_size}")
    pass_index, offset = divmod(step, steps_per_pass)
    while True:
        sampler.set_epoch(pass_index)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(pass_index)
        indices = list(sampler)[offset * batch_size :]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + pass_index)
        yield from DataLoader(
            dataset,
            batch_size,
            sampler=indices,
            drop_last=True,
            num_workers=workers,
            pin_memory=pin_memory,
            generator=generator,
            collate_fn=collate_fn,
        )
        pass_index, offset = pass_index + 1, 0
