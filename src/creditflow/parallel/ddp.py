"""Data parallelism for every rule: ``creditflow train --parallel ddp --nproc N``.

Rules fill ``.grad`` themselves in ``rule.step`` (custom autograd Functions, several backward
roots, cut graphs), so instead of ``DistributedDataParallel``'s reducer hooks, which assume one
backward through one graph, :class:`DataParallel` synchronises explicitly around the step:

1. start: every parameter (frozen ones too) and every buffer (feedback matrices, BatchNorm
   statistics) is broadcast from rank 0, so every rank starts from rank 0's rule;
2. each global batch (``batch_size`` samples, same order and augmentation on every rank) is cut
   into ``nproc`` contiguous shards, one per rank;
3. after ``rule.step``: each trained tensor's ``.grad`` is averaged over ranks, weighted by shard
   size (so a mean-reduced loss gives exactly the gradient of the concatenated batch), in flat
   buckets, one all-reduce per bucket; tensors the rule trains itself outside the optimizer (LTAS
   ``update_first`` modules, DTP ``inverse_first`` inverses) are averaged the same way; buffers a
   rule rewrites every step (``Rule.mutable_buffers``: sign-symmetric and mirrored feedback) are
   broadcast from rank 0;
4. end of each epoch: BatchNorm running statistics are averaged over ranks, every other buffer is
   broadcast from rank 0; rank 0 evaluates and writes metrics, checkpoint and summary (atomically,
   with the one trainer, :class:`creditflow.train.trainer.Trainer`).

The random stream of rank 0 is the single-process one; every other rank draws from its own stream
(reseeded from the seed, its rank and the epoch), so dropout and noise are independent across
shards, as in one process on the whole batch, and resuming reproduces them.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..train.trainer import EXPECTED_ERRORS, Strategy, Trainer, register_strategy
from .launch import (
    barrier,
    device_kind,
    is_torchrun,
    launch,
    log_like_parent,
    warn_if_oversubscribed,
    worker_device,
)
from .messages import broadcast, gather

__all__ = ["DataParallel", "DataParallelStrategy"]

log = logging.getLogger(__name__)

#: the process group's timeout in training: it must outlast rank 0's evaluation and checkpoint
#: (the other ranks wait for it in their next all-reduce). A dead rank is noticed at once anyway
#: (the launcher watches every process).
TRAIN_TIMEOUT_S = 1800.0
#: elements per all-reduce bucket (32 MiB of float32)
BUCKET_NUMEL = 8 * 1024 * 1024


def _is_bn_statistic(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("running_mean", "running_var")


class DataParallel:
    """One rank's side of data-parallel training of a rule (call inside an initialised process group).

        sync = DataParallel()             # after launch() set up the process group
        sync.prepare(rule)                # rank 0's parameters and buffers everywhere
        for x, y in global_batches:
            x, y = sync.shard(x, y)       # this rank's part
            rule.step(x, y)
            sync.after_step()             # averaged .grad: as one process on the whole batch
            opt.step(); opt.zero_grad()

    Exact (same parameters as one process on the concatenated batch, up to float rounding) for
    every rule whose step is a function of the batch through batch-mean losses and whose
    randomness does not depend on the batch; see docs/parallel.md for the list.
    """

    def __init__(self, seed: int = 0, device: torch.device | None = None):
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs an initialised process group; run it under "
                               "creditflow.parallel.launch or torchrun")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = device if device is not None else worker_device()
        self.seed_value = seed
        self.rule: nn.Module | None = None
        self._weight = 1.0 / self.world_size  # this rank's share of the current global batch
        self._presence_tensors: dict = {}
        self._presence_seen: list[tuple[Tensor, tuple[bool, ...]]] = []

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set-up ---------------------------------------------------------------------------------

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, then on the others (e.g. a download into a shared folder)."""
        if self.is_main:
            out = fn()
            barrier()
        else:
            barrier()
            out = fn()
        return out

    def share(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank: tensors and plain data (a checkpoint, a summary; parallel/messages.py)."""
        return broadcast(obj)

    @torch.no_grad()
    def prepare(self, rule: nn.Module) -> None:
        """Broadcast every parameter (frozen ones too) and buffer of ``rule`` from rank 0."""
        self.rule = rule
        in_optimizer = {id(p) for p in rule.trainable_parameters()}
        everything = list(rule.parameters())
        self._trained = [p for p in everything if id(p) in in_optimizer]
        # trained by the rule itself inside step (LAS/LTAS update_first, DTP inverse_first)
        self._self_trained = [p for p in everything if p.requires_grad and id(p) not in in_optimizer]
        mutable = set(getattr(rule, "mutable_buffers", ()))
        named = list(rule.named_buffers())
        self._mutable = [b for n, b in named if n.rsplit(".", 1)[-1] in mutable]
        self._statistics = [b for n, b in named if _is_bn_statistic(n) and b.is_floating_point()]
        stats = {id(b) for b in self._statistics}
        self._other_buffers = [b for _, b in named if id(b) not in stats]
        self._broadcast([p.data for p in everything] + [b for _, b in named])

    def seed(self, epoch: int) -> None:
        """Rank 0 keeps the single-process random stream; rank r > 0 gets its own, per epoch."""
        if not self.is_main:
            torch.manual_seed((self.seed_value * 1_000_003 + self.rank * 10_007 + epoch) % (2 ** 63))

    # -- every step -----------------------------------------------------------------------------

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:
        """This rank's contiguous part of the global batch ``x, y`` (None: fewer samples than ranks)."""
        n = len(y)
        if n < self.world_size:
            return None
        parts = torch.arange(n).tensor_split(self.world_size)
        idx = parts[self.rank]
        self._weight = len(idx) / n
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        return x[lo:hi], y[lo:hi]

    @torch.no_grad()
    def after_step(self) -> None:
        """Average ``.grad`` and self-trained tensors over ranks; rank 0's mutable buffers everywhere."""
        if self.rule is None:
            raise RuntimeError("call DataParallel.prepare(rule) first")
        self._average_grads()
        if self._self_trained:  # p - lr g_r averaged with shard weights = p - lr (sum_r w_r g_r)
            self._all_reduce([p.data for p in self._self_trained], scale=self._weight)
        if self._mutable:
            self._broadcast(self._mutable)

    def _average_grads(self) -> None:
        params = self._trained
        for bucket in _buckets(params):
            grads = [p.grad for p in bucket]
            if any(g is not None and g.is_sparse for g in grads):
                raise NotImplementedError("DataParallel: sparse gradients are not supported")
            ref = bucket[0]
            parts = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(bucket, grads)]
            flat = torch.cat(parts)
            flat.mul_(self._weight)
            local = tuple(g is not None for g in grads)
            flat = torch.cat([flat, self._presence(local, ref)])  # which ranks had a gradient: one all-reduce
            dist.all_reduce(flat)
            n = flat.numel() - len(bucket)
            # Which tensors keep a gradient is decided from this rank's own pattern, with no host sync:
            # every rank of a rule has the same one (checked at epoch end, one sync for the epoch).
            self._presence_seen.append((flat[n:], local))
            if len(self._presence_seen) >= 256:  # a loop that never syncs buffers still gets checked
                self.check_presence()
            offset = 0
            for p, present in zip(bucket, local):
                g = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if not present:  # no rank had one: stay None (an optimizer skips it, as in one process)
                    p.grad = None
                else:
                    p.grad.copy_(g)

    def _presence(self, local: tuple[bool, ...], ref: Tensor) -> Tensor:
        """This rank's gradient pattern as a device tensor, made once per pattern (no copy per step)."""
        key = (local, ref.dtype, ref.device)
        if key not in self._presence_tensors:
            self._presence_tensors[key] = torch.tensor(local, dtype=ref.dtype, device=ref.device)
        return self._presence_tensors[key]

    def check_presence(self) -> None:
        """Every rank had a gradient for the same tensors at every step since the last check."""
        seen, self._presence_seen = self._presence_seen, []
        if not seen:
            return
        sums = torch.cat([s for s, _ in seen])
        expected = torch.tensor([float(self.world_size if p else 0) for _, local in seen for p in local],
                                dtype=sums.dtype, device=sums.device)
        if not torch.equal(sums, expected):
            raise RuntimeError("data-parallel ranks gave gradients to different tensors in one step; "
                               "DataParallel needs every rank's step to reach the same tensors")

    # -- every epoch ----------------------------------------------------------------------------

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """BatchNorm running statistics averaged over ranks; every other buffer from rank 0 (and the
        epoch's check that every rank's gradients reached the same tensors)."""
        self.check_presence()
        if self._statistics:
            self._all_reduce(self._statistics, scale=1.0 / self.world_size)
        if self._other_buffers:
            self._broadcast(self._other_buffers)

    def totals(self, loss_sum: Tensor, correct: Tensor, seen: int, extra_sums: dict[str, Tensor]):
        """An epoch's sums over every rank: loss and correct summed, step metrics averaged."""
        names = sorted(extra_sums)
        values = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=loss_sum.device,
                                                                                   dtype=torch.float64)]
                             + [torch.as_tensor(extra_sums[k], device=loss_sum.device).double() for k in names])
        dist.all_reduce(values)
        loss, hits, n = values[0], values[1].round().long(), int(values[2].item())
        extras = {k: values[3 + i] / self.world_size for i, k in enumerate(names)}
        return loss, hits, n, extras

    # -- collectives ----------------------------------------------------------------------------

    def _broadcast(self, tensors: list[Tensor]) -> None:
        for bucket in _buckets(tensors):
            flat = _flatten_dense_tensors([t.detach() for t in bucket])
            dist.broadcast(flat, src=0)
            for t, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(v)

    def _all_reduce(self, tensors: list[Tensor], scale: float) -> None:
        for bucket in _buckets(tensors):
            flat = _flatten_dense_tensors([t.detach() for t in bucket]).mul_(scale)
            dist.all_reduce(flat)
            for t, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(v)


def _buckets(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive groups of one device and dtype, each at most BUCKET_NUMEL elements (or one tensor)."""
    groups: dict[tuple, list[list[Tensor]]] = {}
    sizes: dict[tuple, int] = {}
    for t in tensors:
        key = (t.device, t.dtype)
        if key not in groups or sizes[key] + t.numel() > BUCKET_NUMEL:
            groups.setdefault(key, []).append([])
            sizes[key] = 0
        groups[key][-1].append(t)
        sizes[key] += t.numel()
    return [b for bs in groups.values() for b in bs if b]


# -- the strategy -------------------------------------------------------------------------------

def check(cfg) -> None:
    if cfg.nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {cfg.nproc}")
    if cfg.batch_size % cfg.nproc:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by --nproc {cfg.nproc}: each of the "
                         f"{cfg.nproc} processes takes an equal share of every batch")
    warn_if_oversubscribed(cfg.nproc, "--nproc", cfg.device)


@register_strategy("ddp")
class DataParallelStrategy(Strategy):
    """``--parallel ddp``: every rank runs the one-process loop on its shard of each batch, with
    :class:`DataParallel` synchronising around each step; rank 0 evaluates and writes."""

    #: ranks look at the stop request together every this many steps (one tiny gloo all-reduce)
    STOP_CHECK_EVERY = 10

    @classmethod
    def run(cls, cfg, *, resume=False, progress=True, callbacks=()):
        if is_torchrun():  # torchrun decides how many processes there are
            cfg = cfg.model_copy(update={"nproc": int(os.environ["WORLD_SIZE"])})
        check(cfg)
        kind = device_kind(cfg.device)
        level = logging.getLogger().getEffectiveLevel()
        args = (cfg.model_dump(mode="json"), resume, progress, level, list(callbacks))
        return launch(_rank_main, cfg.nproc, args, backend=cfg.backend, device=kind, timeout_s=TRAIN_TIMEOUT_S,
                      role="rank", unwrap=EXPECTED_ERRORS)[0]

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sync = DataParallel(seed=cfg.seed)
        self.rank, self.world_size = self.sync.rank, self.sync.world_size
        # host-side agreement on a stop (and a cut's per-rank state), off the NCCL stream
        self.control = dist.new_group(list(range(self.world_size)), backend="gloo")

    @property
    def device(self):
        return self.sync.device

    def load_data(self, load):
        return super().load_data(lambda: self.sync.main_first(load))  # one download, not one per rank

    def prepare(self, rule, checkpoint):
        super().prepare(rule, checkpoint)
        self.sync.prepare(rule)

    def before_epoch(self, epoch):
        self.sync.seed(epoch)

    def shard(self, x, y):
        return self.sync.shard(x, y)

    def stop_agreed(self, requested, step):
        """A signal may reach the ranks at different steps: every STOP_CHECK_EVERY steps they take the
        maximum of their requests, so all stop after the same step."""
        if step % self.STOP_CHECK_EVERY:
            return False
        flag = torch.tensor([int(requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag)

    def gather_all(self, obj):
        return gather(obj, self.control)

    def after_step(self):
        self.sync.after_step()  # average .grad (and rule-owned state) over ranks

    def totals(self, loss_sum, correct, seen, extra):
        return self.sync.totals(loss_sum, correct, seen, extra)

    def after_epoch(self):
        self.sync.sync_buffers()  # BatchNorm statistics agree on every rank before rank 0 evaluates

    def gather(self, obj):
        # the optimizer and scheduler are the same on every rank; the other ranks' random streams
        # are reseeded every epoch (DataParallel.seed): rank 0's state is the run's
        return [obj] if self.is_main else None

    def share(self, obj):
        return self.sync.share(obj)

    def rule_state(self, rule):
        return rule.state_dict() if self.is_main else None

    def describe(self):
        return {"nproc": self.world_size}


def _rank_main(rank: int, world_size: int, cfg_json: dict, resume: bool, progress: bool, level: int, callbacks):
    from ..train.config import RunConfig

    log_like_parent(rank, level)
    cfg = RunConfig.model_validate(cfg_json)
    strategy = DataParallelStrategy(cfg)
    return Trainer(cfg, strategy, callbacks, progress).fit(resume)
