"""BatchNorm statistics of an EMA model, recalibrated before it is evaluated or saved (precise BN).

The EMA keeps a moving average of every state entry, BatchNorm's running mean and variance included. Those buffers
are the raw model's running statistics (themselves a 0.9-momentum average, computed with the weights of the last
few steps) averaged once more at the EMA's decay: statistics of much older weights than the averaged weights they
normalise. On a long, slow run the difference fades; on a short or fast one the EMA weights are good and their
statistics are not, and the EMA model is much worse than it should be (10% vs 96% top-1 measured on a short run).

:func:`recalibrate_bn` replaces those statistics by the exact ones of the EMA weights: it runs a few training
batches through the model with only the BatchNorm layers in train mode and ``momentum=None`` (the cumulative
average of the batches' statistics), under ``no_grad``. Dropout and drop path stay in eval mode, so no global RNG is
drawn. :class:`RecalibrationBatches` gives those batches from a fixed, seeded draw of the training images with the
evaluation transform, through a loader of its own: the run's data order and RNG streams are untouched, and a resumed
run draws the same batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sized

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "RecalibrationBatches",
    "average_bn_statistics",
    "batchnorm_layers",
    "recalibrate_bn",
    "recalibration_batch_count",
]


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (a LayerNorm model has none)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def average_bn_statistics(layers: Iterable[_BatchNorm]) -> None:
    """Average the running statistics of ``layers`` over the processes (a collective under torchrun; nothing
    without one), as timm's ``train.py`` does after every epoch (``--dist-bn reduce``, its default): DDP broadcasts
    rank 0's buffers at the start of each training forward, so after an epoch every process holds the statistics of
    its own last batch. Averaged, every process evaluates the same model, the one the checkpoint saves."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for m in layers:
        for t in (m.running_mean, m.running_var):
            torch.distributed.all_reduce(t)
            t.div_(world)


# the recalibration reads at most this fraction of an epoch's batches: its forward passes and image reads stay a few
# percent of the epoch's work on a small set (the digits recipe: 3 batches, not 8, of its 22)
RECAL_EPOCH_FRACTION = 8


def recalibration_batch_count(requested: int, epoch_batches: int) -> int:
    """How many batches recalibrate the EMA's BatchNorm statistics: ``requested`` (``--ema-bn-recal``), at most an
    eighth of an epoch's ``epoch_batches`` rounded up (so at least one), 0 when ``requested`` is 0."""
    if requested <= 0:
        return 0
    return min(requested, -(-epoch_batches // RECAL_EPOCH_FRACTION))


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    average_processes: bool = True,
) -> int:
    """Set the running statistics of every BatchNorm layer of ``model`` to the cumulative average of the batch
    statistics of ``batches`` (inputs already on the model's device and layout); returns the number of batches.

    Each layer's momentum, ``num_batches_tracked`` and every module's train/eval mode are restored afterwards, so
    only ``running_mean`` and ``running_var`` change. With no batch at all nothing changes. Under torchrun
    (``average_processes``) the statistics are averaged over the processes, which keeps an EMA model identical on
    every rank when each process recalibrates on its own images (the same number of batches each).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    modes = {m: m.training for m in model.modules()}
    saved = [(m.momentum, m.num_batches_tracked.clone(), m.running_mean.clone(), m.running_var.clone()) for m in layers]
    n = 0
    try:
        model.eval()  # dropout and drop path off: no RNG drawn, the features of the weights being evaluated
        for m in layers:
            m.train()
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: the mean of the batches' statistics
        for x in batches:
            with autocast():
                model(x)
            n += 1
    finally:
        for m, (momentum, tracked, mean, var) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
            if n == 0:  # interrupted or empty: keep the statistics it had
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        for m, training in modes.items():
            m.training = training
    if average_processes:
        average_bn_statistics(layers)
    return n


class _Transformed(Dataset):
    """``dataset``'s images through a deterministic ``transform`` (the evaluation one: no RNG, no re-seeding)."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        return self.transform(img), target


class _EpochDraw(Sampler[int]):
    """``count`` indices of ``size``, a permutation drawn from (seed, epoch) by a generator of its own; process
    ``rank`` takes the rank-th disjoint slice."""

    def __init__(self, size: int, count: int, seed: int, rank: int) -> None:
        self.size, self.count, self.seed, self.rank = size, count, seed, rank
        self.epoch = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        state = np.random.SeedSequence([self.seed, self.epoch, 0xB7]).generate_state(1)[0]
        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(int(state)))
        return iter(perm[self.rank * self.count : (self.rank + 1) * self.count].tolist())


class RecalibrationBatches:
    """The batches :func:`recalibrate_bn` runs after each epoch: ``num_batches`` batches of ``batch_size`` training
    images per process, drawn afresh for every epoch from (seed, epoch), disjoint across processes.

    The images go through the evaluation transform, not the training one. The statistics are only ever used to
    evaluate, on evaluation-transformed images, so those are the inputs to measure; the training augmentations
    (RandAugment, erasing, Mixup/CutMix, small random crops) would shift them, and being deterministic the
    evaluation transform needs no seeding (no RNG state to save and restore per image).
    """

    def __init__(
        self,
        dataset: Dataset,
        eval_transform: Callable,
        *,
        num_batches: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if not isinstance(dataset, Sized):
            raise TypeError("EMA BatchNorm recalibration needs an indexable training set (len and [i])")
        # never more than one epoch's batches per process, so processes draw disjoint images
        self.num_batches = min(num_batches, len(dataset) // (batch_size * world_size))
        self.sampler = _EpochDraw(len(dataset), self.num_batches * batch_size, seed, rank)
        self.loader = DataLoader(
            _Transformed(dataset, eval_transform),
            batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,  # the draw is made here, in the sampler: workers need not restart
            # the loader's own generator: its base seed is not drawn from (and does not advance) the global RNG
            generator=torch.Generator().manual_seed(seed),
        )

    def __call__(self, epoch: int, device: torch.device, channels_last: bool = False) -> Iterator[torch.Tensor]:
        """The epoch's input batches on ``device`` (labels dropped)."""
        self.sampler.epoch = epoch
        self.loader.generator.manual_seed(self.sampler.seed + epoch)  # worker seeds too: the same after a resume
        for x, _ in self.loader:
            x = x.to(device, non_blocking=True)
            yield x.contiguous(memory_format=torch.channels_last) if channels_last else x
