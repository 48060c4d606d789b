"""Pipelined multi-process training of the decoupled rules (Associated Learning, direct rules).

``creditflow train --parallel pipeline --stages S`` (or :func:`train_pipeline`) places a rule's
units (AL components; a direct rule's hidden blocks and its top) on S processes, one stage each
(:mod:`creditflow.parallel.stages`), and streams micro-batches through them with
``torch.distributed`` point-to-point messages (gloo on CPU, NCCL and one GPU per stage on CUDA).
:func:`fit` is the same engine for a rule object and a list of batches.

Messages (:mod:`creditflow.parallel.transport`, one process group per channel): forward, stage
s -> s+1, a host header ``[k, n]`` and the labels and boundary tensors (a direct rule's ``h``; AL's
``s`` and ``t``) padded to the batch size, so a receiver posts the next message before it needs it;
errors, last stage -> every stage whose blocks need them (direct rules but DRTP, local classifiers,
Shallow), ``[e | logits]``; AL's decoded predictions back down.

Schedule (``docs/parallel.md`` has the table). Each stage updates its own tensors with its own
optimizer as soon as it has what it needs:

- AL, DRTP, local classifiers, Shallow: right after the stage's own forward of batch k, in both
  schedules; stages run concurrently on different micro-batches (the AL paper's Table 1) and the
  result equals single-process training.
- DFA, LAS, LTAS, ``sync``: stage s applies batch k's update with ``e_k`` before its forward of
  k+1. Forwards run one stage after another, but all stages' backwards and optimizer steps run at
  once once ``e_k`` is out (DFA's backward unlocking); equals single-process training.
- DFA, LAS, LTAS, ``async``: stage s uses ``e_{k-d}``, ``d = S-1-s``, when it has just forwarded
  batch k: the error of the batch the last stage finished d micro-batches earlier, which in a
  balanced pipeline has already arrived, so nobody waits. Its blocks' graph of batch k-d is kept,
  with the weights its forward used (weight stashing), so ``delta`` and ``h`` still belong to one
  batch; the gradient is applied to the current weights. Each epoch ends with a flush: every batch
  gets exactly one update per stage.

Failure: the launcher (:func:`~creditflow.parallel.launch.launch`, role ``"stage"``) stops every
stage once one dies or raises and raises :class:`~creditflow.parallel.launch.WorkerFailed` naming it;
checkpoints are written by rank 0 only, atomically, after every stage's state has been gathered.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..rules.base import OutputError
from ..train.loop import EpochProgress
from ..train.trainer import (
    DIVERGENCE_CHECK_EVERY,
    EXPECTED_ERRORS,
    DataInfo,
    EpochTotals,
    Strategy,
    Trainer,
    register_strategy,
)
from .launch import (
    device_kind,
    launch,
    log_like_parent,
    warn_if_oversubscribed,
    worker_device,
)
from .messages import broadcast, gather, pack, unpack
from .stages import (
    BALANCES,
    Plan,
    Stage,
    check_pipelinable,
    make_plan,
    pipelinable_rules,
)
from .transport import Groups, Links, make_groups

log = logging.getLogger(__name__)

SCHEDULES = ("sync", "async")


def lag(stage: Stage, schedule: str) -> int:
    """How many micro-batches old the error a stage uses is (0: the batch it just forwarded)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; available: {', '.join(SCHEDULES)}")
    if schedule == "sync" or not stage.waits_for_error:
        return 0
    return stage.num_stages - 1 - stage.index


class EpochStats(NamedTuple):
    loss_sum: float
    correct: int | None
    seen: int
    steps: int
    metrics: dict[str, float]  # sums over steps
    start: float  # wall clock (time.time) of this stage's first step
    start_timed: float  # ... of its first step after ``warmup`` steps
    end: float
    busy_s: float | None  # forward, update and optimizer step (None: not measured, see Runner)
    wait_s: float | None  # blocked on a message
    losses: list[float]  # per step (only with record_losses)
    diverged: tuple[int, float, float] | None = None  # (global step, loss, first loss): this stage's first diverged step


class Runner:
    """Drives one stage through micro-batches under a schedule."""

    def __init__(self, stage: Stage, links: Links, schedule: str, optimizer: torch.optim.Optimizer,
                 step_hook: Callable[[int, int], None] | None = None, profile: bool = False,
                 record_losses: bool = False, watch=None, check: Callable[[], None] | None = None):
        self.stage, self.links, self.opt = stage, links, optimizer
        # every DIVERGENCE_CHECK_EVERY steps: raises if this stage's part of the loss diverged; the
        # launcher then stops every stage and the run ends with this stage's one line
        self.check = check
        self.schedule, self.lag = schedule, lag(stage, schedule)
        self.hook, self.profile, self.record_losses = step_hook, profile, record_losses
        self.watch = watch  # the trainer's DivergenceWatch: this stage's part of each step's loss
        self.global_step = 0
        self.cuda = getattr(stage, "device", torch.device("cpu")).type == "cuda"
        # A host clock sees a CUDA stage's work only if each reading waits for the device; that costs
        # a sync per reading, so on CUDA busy/wait times are taken with profile=True only (else None).
        self.timed = profile or not self.cuda

    def _now(self) -> float:
        if self.profile and self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _step(self) -> None:
        if self.opt is None:  # a stage of frozen blocks only (Shallow)
            return
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run_epoch(self, steps: int, batches: Iterator[tuple[Tensor, Tensor]] | None, warmup: int = 0,
                  stop: Callable[[], bool] | None = None, start: EpochProgress | None = None) -> EpochStats:
        """``steps`` micro-batches, or fewer: stage 0 asks ``stop()`` after each, and the stages after it
        learn it from the batch's header, so every stage stops after the same micro-batch (its updates
        applied and the queues flushed, as at an epoch's end); ``EpochStats.steps`` says how many.
        ``start``: this stage's sums of the part of the epoch a cut left (the sums go on from them)."""
        stage, links, rule = self.stage, self.links, self.stage.rule
        stage.train()
        dev = stage.device
        start = start or EpochProgress.none()
        loss_sum = torch.tensor(start.loss_sum, device=dev)
        correct = torch.tensor(start.correct, dtype=torch.long, device=dev)
        metric_sums: dict[str, Tensor] = {n: torch.tensor(v, device=dev) for n, v in start.metrics.items()}
        seen, busy, wait, losses = start.seen, 0.0, 0.0, []
        queue: deque = deque()  # (record, stash) waiting for their output error
        decode_queue: deque = deque()  # records waiting for the prediction from the stage above
        decode_lag = stage.num_stages - 1 - stage.index
        runs_down = rule.prediction_runs_down
        start = start_timed = time.time()
        for k in range(steps):
            if k == warmup and k:
                start_timed = time.time()
            if self.hook is not None:
                self.hook(stage.index, self.global_step)
            t0 = self._now()
            if stage.is_first:
                x, y = next(batches)
                inputs = rule.first_inputs(x, y)
                last = k + 1 < steps and stop is not None and stop()
            else:
                inputs, y, last = links.recv_forward(prefetch=k + 1 < steps)
            t1 = self._now()
            wait += t1 - t0
            waited_before = wait
            record, pairs, send = stage.forward(inputs, y, stash=self.lag > 0)
            if not stage.is_last:
                links.send_forward(k, y, send, last)
            step_loss = torch.zeros((), device=dev)
            if stage.is_last:
                error = rule.output_error(record)
                if error is not None:
                    step_loss = step_loss + error.loss
                    if links.receivers:
                        links.send_errors(error.e, error.logits)
                prediction = rule.prediction(record, error)  # before the optimizer moves the decoders
                part = self._update(record, pairs, error, metric_sums)
                if not runs_down or stage.is_first:
                    correct += (prediction.argmax(-1) == y).sum()
                else:
                    links.send_decode(prediction)
            elif not stage.waits_for_error:
                part = self._update(record, pairs, None, metric_sums)
            else:
                part = None
                links.post_error()
                queue.append((record, pairs))
                if len(queue) > self.lag:
                    wait += self._update_oldest(queue, metric_sums)
            if part is not None:
                step_loss = step_loss + part
            if runs_down and not stage.is_last:  # the batch the stage above decoded d steps ago
                links.post_decode()
                decode_queue.append(record)
                if len(decode_queue) > decode_lag:
                    wait += self._decode_oldest(decode_queue, correct)
            loss_sum += step_loss * len(y)
            if self.watch is not None:
                self.watch.observe(self.global_step, step_loss)
            if self.record_losses:
                losses.append(float(step_loss))
            seen += len(y)
            self.global_step += 1
            busy += self._now() - t1 - (wait - waited_before)  # waits for errors/decodes are not work
            if self.check is not None and self.global_step % DIVERGENCE_CHECK_EVERY == 0:
                self.check()
            if last:
                steps = k + 1
                break
        while queue:  # flush: the last d batches' updates
            t1 = self._now()
            w = self._update_oldest(queue, metric_sums)
            wait += w
            busy += self._now() - t1 - w
        while decode_queue:
            t1 = self._now()
            w = self._decode_oldest(decode_queue, correct)
            wait += w
            busy += self._now() - t1 - w
        links.flush()
        if self.cuda:
            torch.cuda.synchronize()
        end = time.time()
        counts = stage.is_first if runs_down else stage.is_last  # who sees the prediction
        busy, wait = (busy, wait) if self.timed else (None, None)
        return EpochStats(loss_sum.item(), int(correct.item()) if counts else None, seen, steps,
                          {n: float(v) for n, v in metric_sums.items()}, start, start_timed, end, busy, wait,
                          losses, self.watch.check() if self.watch is not None else None)

    def _update(self, record, pairs, error, metric_sums) -> Tensor | None:
        part = self.stage.update(record, pairs, error)
        self._step()
        for name, v in self.stage.rule.step_metrics().items():
            metric_sums[name] = metric_sums.get(name, 0) + v.float()
        return part

    def _decode_oldest(self, queue: deque, correct: Tensor) -> float:
        record = queue.popleft()
        t0 = self._now()
        t = self.links.take_decode(len(record.y))
        waited = self._now() - t0
        t = self.stage.rule.decode_units(record, t)
        if self.stage.is_first:
            correct += (t.argmax(-1) == record.y).sum()
        else:
            self.links.send_decode(t)
        return waited

    def _update_oldest(self, queue: deque, metric_sums) -> float:
        record, pairs = queue.popleft()
        t0 = self._now()
        e, logits = self.links.take_error(len(record.y))
        waited = self._now() - t0
        # the loss stays on the last stage: this stage's error message carries e and the logits only
        self._update(record, pairs, OutputError(e.new_zeros(()), e, logits), metric_sums)
        return waited


# --- process setup shared by the trainer and fit() -----------------------------------------------

def error_receivers(rule, plan: Plan) -> list[int]:
    """The stages that wait for the last stage's output error."""
    return [s for s, r in enumerate(plan.stages[:-1]) if rule.waits_for_error(r)]


def setup_stage(rule, plan: Plan, rank: int, device: torch.device, groups: Groups,
                batch_size: int) -> tuple[Stage, Links]:
    stage = Stage(rule, plan, rank).to(device)
    dtype = next(rule.model.parameters()).dtype
    links = Links(stage, plan, batch_size, rule.num_classes, dtype, device, groups,
                  error_receivers(rule, plan))
    return stage, links


def to_cpu(obj):
    """A copy of ``obj`` (nested dicts, lists, tuples) with every tensor moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def merge_states(base: dict[str, Tensor], parts: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The whole rule's state: ``base`` (fixed tensors, identical on every stage) overwritten by each stage's own."""
    merged = {n: t.detach().cpu() for n, t in base.items()}
    for part in parts:
        merged.update(part)
    return merged


# --- fit: a rule object and a list of batches ----------------------------------------------------

def fit(rule, batches: Sequence[tuple[Tensor, Tensor]], *, stages: int = 2, schedule: str = "sync",
        optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None, local_lr: float | None = None,
        balance: str = "params", backend: str = "auto", device: str = "cpu", timeout_s: float = 60.0,
        step_hook: Callable[[int, int], None] | None = None, profile: bool = False, warmup: int = 0) -> dict[str, Any]:
    """Train ``rule`` in place on ``batches`` (one pass) with an S-stage pipeline; return statistics.

    Args:
        rule: a direct rule on an ``nn.Sequential`` model, or ``al`` on an AssociatedNet (CPU).
        batches: ``(x, y)`` pairs, already normalised; sent to the stages (keep them small).
        optimizer: ``param_groups -> torch.optim.Optimizer``, e.g. ``functools.partial(torch.optim.SGD,
            lr=0.1)`` (picklable); every stage builds its own over ``rule.param_groups(local_lr)``
            restricted to its tensors. Default: SGD, lr 0.01.
        step_hook: ``hook(stage, step)`` called in every stage before each step (tests kill a stage here).
        warmup: steps left out of ``samples_per_second`` (they still train).

    Returns:
        ``{"losses": per-step loss (last stage; AL: summed over stages), "correct": right training
        predictions (at each step's weights, as ``StepResult.logits``), "plan": [[units] per stage],
        "seconds", "samples_per_second", "stage_busy_s", "stage_wait_s"}``. The trained state is
        loaded into ``rule``.
    """
    if optimizer is None:
        import functools

        optimizer = functools.partial(torch.optim.SGD, lr=0.01)
    if balance not in BALANCES:
        raise ValueError(f"unknown balance {balance!r}; available: {', '.join(BALANCES)}")
    if schedule not in SCHEDULES:  # fail before spawning
        raise ValueError(f"unknown pipeline schedule {schedule!r}; available: {', '.join(SCHEDULES)}")
    batches = [(x.detach().cpu(), y.detach().cpu()) for x, y in batches]
    sent = rule if all(t.device.type == "cpu" for t in rule.state_dict().values()) else copy.deepcopy(rule).cpu()
    args = (sent, batches, optimizer, local_lr, stages, schedule, balance, step_hook, profile, warmup)
    results = launch(_fit_worker, stages, args, backend=backend, device=device, timeout_s=timeout_s, role="stage")
    out = unpack(results[0])
    rule.load_state_dict(out.pop("state"))
    return out


def _fit_worker(rank, world, rule, batches, optimizer, local_lr, stages, schedule, balance, step_hook, profile, warmup):
    device = worker_device()
    groups = make_groups()
    batch_size = max(len(y) for _, y in batches)
    plan = make_plan(rule, stages, balance, batch_size, device) if rank == 0 else None
    plan = Plan.from_plain(broadcast(plan.plain() if plan is not None else None, groups.control))
    base = {n: t.detach().clone() for n, t in rule.state_dict().items()} if rank == 0 else None
    stage, links = setup_stage(rule, plan, rank, device, groups, batch_size)
    groups_ = stage.param_groups(local_lr)
    opt = optimizer(groups_) if groups_ else None
    runner = Runner(stage, links, schedule, opt, step_hook, profile=profile, record_losses=True)
    it = ((x.to(device), y.to(device)) for x, y in batches) if rank == 0 else None
    stats = runner.run_epoch(len(batches), it, warmup)
    reports = gather((to_cpu(stage.owned_state()), stats._asdict()), groups.control)
    if rank != 0:
        return None
    states, all_stats = zip(*reports)
    all_stats = [EpochStats(**s) for s in all_stats]
    losses = [sum(v) for v in zip(*(s.losses for s in all_stats))]  # each stage's part of the step's loss
    seconds = max(s.end for s in all_stats) - all_stats[0].start_timed
    timed = sum(len(y) for _, y in batches[warmup:])
    return pack({"state": merge_states(base, states), "losses": losses, "plan": [list(r) for r in plan.stages],
                 "correct": next((s.correct for s in all_stats if s.correct is not None), None),
                 "seconds": seconds, "samples_per_second": timed / seconds,
                 "stage_busy_s": [s.busy_s for s in all_stats], "stage_wait_s": [s.wait_s for s in all_stats]})


# --- the strategy: creditflow train --parallel pipeline ------------------------------------------

@register_strategy("pipeline")
class PipelineStrategy(Strategy):
    """``--parallel pipeline --stages S``: each process trains one stage of the rule's units.

    Rank 0 feeds the batches, evaluates and writes (the trainer's own code); the checkpoint holds the
    whole rule (every stage's part gathered) and each stage's optimizer state by parameter name, so
    a run resumes with another ``--stages`` too (exactly with the same one). Metrics rows add
    ``samples_per_second`` and per-stage ``stage_busy_s``/``stage_wait_s``.
    """

    steps_whole_rule = False
    balance = "params"

    @classmethod
    def run(cls, cfg, *, resume=False, progress=True, callbacks=(), timeout_s: float = 60.0):
        from ..registry import RULES
        from ..rules.base import BACKWARD_LOCKED

        if RULES.get(cfg.rule).builder.pipeline_refusal() is not None:  # fail before spawning; the stage count is checked there
            raise ValueError(f"rule {cfg.rule!r} cannot be pipelined: {BACKWARD_LOCKED}; the pipeline runs "
                             f"{', '.join(pipelinable_rules())}")
        device = device_kind(cfg.device)
        warn_if_oversubscribed(cfg.stages, "--stages", device)
        level = logging.getLogger().getEffectiveLevel()
        args = (cfg.model_dump(mode="json"), resume, progress, list(callbacks), level)
        return launch(_stage_main, cfg.stages, args, backend=cfg.backend, device=device, timeout_s=timeout_s,
                      role="stage", unwrap=EXPECTED_ERRORS)[0]

    def __init__(self, cfg):
        super().__init__(cfg)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.groups = make_groups()

    @property
    def device(self):
        return worker_device()

    def load_data(self, load):
        splits = load() if self.is_main else None
        info = DataInfo(tuple(splits.shape), splits.num_classes, len(splits.train))._asdict() if self.is_main else None
        return splits, DataInfo(**broadcast(info, self.groups.control))

    def prepare(self, rule, checkpoint):
        super().prepare(rule, checkpoint)
        cfg, plan = self.cfg, None
        if self.is_main:
            check_pipelinable(rule, self.world_size, cfg.rule)
            saved = (checkpoint or {}).get("strategy") or {}
            parts = [range(*r) for r in saved["plan"]] if len(saved.get("plan", ())) == self.world_size else None
            plan = make_plan(rule, self.world_size, self.balance, cfg.batch_size, self.device, parts=parts)
            for line in plan.describe(rule):
                log.info("%s", line)
            # the fixed tensors (feedback matrices) are the same everywhere; the trained ones come from their stage
            self.base = {n: t.detach().to("cpu", copy=True) for n, t in rule.state_dict().items()}
        self.plan = Plan.from_plain(broadcast(plan.plain() if plan is not None else None, self.groups.control))
        self.stage, self.links = setup_stage(rule, self.plan, self.rank, self.device, self.groups, cfg.batch_size)

    def param_groups(self, rule):
        return self.stage.param_groups(self.cfg.local_lr)

    def needs_batches(self):
        return self.is_main

    def run_epoch(self, trainer, batches, steps, epoch, start=None):
        # divergence is seen per stage (its part of the loss): a stage checks its own every
        # DIVERGENCE_CHECK_EVERY steps and raises, which stops every stage (the launcher); the rest of
        # the epoch is gathered and checked at its end, with the first bad step over all stages
        runner = Runner(self.stage, self.links, self.cfg.pipeline_schedule, trainer.optimizer,
                        lambda stage, step: trainer.step_started(step), watch=trainer.watch,
                        check=trainer.check_divergence)
        runner.global_step = trainer.global_step
        start = start or EpochProgress.none()  # this stage's part of a cut epoch
        todo = steps - start.steps
        stats = runner.run_epoch(todo, batches, stop=lambda: trainer.stop.requested, start=start)  # stage 0 asks
        done = stats.steps
        trainer.global_step = runner.global_step - done
        trainer.advance(done)
        # the sums went on from the cut's; the steps and the time are this run's
        stats = stats._replace(steps=start.steps + done, start=stats.start - start.seconds)
        if done < todo:  # a signal: every stage stopped after the same micro-batch
            trainer.cut = EpochProgress(stats.steps, stats.loss_sum, stats.correct or 0, stats.seen,
                                        stats.end - stats.start, stats.metrics)
            return None
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        reports = self.gather((stats._asdict(), peak))
        if not self.is_main:
            return None
        all_stats, peaks = zip(*reports)
        all_stats = [EpochStats(**s) for s in all_stats]
        trainer.check_divergence(min((tuple(s.diverged) for s in all_stats if s.diverged), default=None))
        metrics: dict[str, float] = {}
        for s in all_stats:
            metrics.update({n: v / max(s.steps, 1) for n, v in s.metrics.items()})
        return EpochTotals(sum(s.loss_sum for s in all_stats), next((s.correct for s in all_stats
                                                                       if s.correct is not None), None),
                           all_stats[0].seen, steps, max(s.end for s in all_stats) - all_stats[0].start, metrics,
                           None, max(p or 0 for p in peaks) or None,
                           *([None if t is None else round(t, 4) for t in times]
                             for times in ([s.busy_s for s in all_stats], [s.wait_s for s in all_stats])))

    def stop_agreed(self, requested, step):
        return bool(self.share(requested))  # stage 0's request: the stages stop where it does

    def gather_all(self, obj):
        return self.gather(obj)

    def gather(self, obj):
        return gather(to_cpu(obj), self.groups.control)

    def share(self, obj):
        return broadcast(obj, self.groups.control)

    def rule_state(self, rule):
        parts = self.gather(self.stage.owned_state())
        if not self.is_main:
            return None
        merged = merge_states(self.base, parts)
        rule.load_state_dict(merged)  # rank 0 evaluates the whole trained network
        return merged

    def release(self):
        broadcast(None, self.groups.control)  # wait here, not on a data channel, while rank 0 evaluates

    def describe(self):
        return {"stages": self.world_size, "schedule": self.cfg.pipeline_schedule,
                "plan": [[r.start, r.stop] for r in self.plan.stages]}


def _stage_main(rank, world, cfg_json, resume, progress, callbacks, level=logging.INFO):
    log_like_parent(rank, level)  # stage 0 prints the epoch lines, as one process and DDP do
    from ..train.config import RunConfig

    cfg = RunConfig.model_validate(cfg_json)
    return Trainer(cfg, PipelineStrategy(cfg), callbacks, progress).fit(resume)


__all__ = ["SCHEDULES", "PipelineStrategy", "fit", "lag"]
