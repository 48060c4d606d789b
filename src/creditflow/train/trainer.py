"""The trainer: one loop for every way of running a rule (one process, data parallel, pipeline).

:class:`Trainer` owns what a run writes and when: the run folder, ``config.yaml``, resume,
``metrics.jsonl`` (one row per epoch, one schema in every mode), the atomic checkpoint, the NaN
stop and ``summary.json`` (test accuracy at the best *validation* epoch). Where the steps run is a
:class:`Strategy`: :class:`SingleProcess` here; data parallelism and the pipeline in
:mod:`creditflow.parallel`, which registers them (this package never imports it). What is
measured on the side is a :class:`Callback` (progress bar, saved-activation bytes, the alignment
probe of ``creditflow align``).

Every process of a run runs the same ``Trainer.fit``; the strategy says which is the main one
(rank 0: it evaluates and writes) and moves what must cross processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from .. import data, models, rules
from ..devices import resolve_device
from ..mechanisms.modes import eval_mode
from ..report import plot_curves
from .callbacks import Callback, SavedActivations
from .checkpoint import load_checkpoint, save_checkpoint, write_text
from .config import PLACEMENT_KEYS, RunConfig, dump_yaml
from .divergence import DIVERGENCE_CHECK_EVERY, Diverged, DivergenceWatch, NonFiniteLoss
from .loop import EpochLoop, EpochProgress
from .metrics import read_jsonl, summarize, write_jsonl, write_summary
from .optim_state import (
    load_named_optimizer_state,
    make_optimizer,
    make_scheduler,
    named_optimizer_state,
)
from .precision import Precision
from .preemption import Preempted, stop_signals
from .runfolder import claim, config_diff, finished_summary

log = logging.getLogger(__name__)


#: failures a worker re-raises as themselves (what one process would have raised), reported in one line
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, Diverged, Preempted)


def use_deterministic_algorithms() -> None:
    """``--deterministic``: algorithms that repeat bit for bit on CUDA too (slower). cuBLAS needs its
    workspace setting before its first call; an op without a deterministic kernel then fails by name
    instead of varying silently."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


class DataInfo(NamedTuple):
    """What every process needs of the data, including one that never reads a batch."""

    shape: tuple[int, ...]
    num_classes: int
    train_size: int


def build_rule(cfg: RunConfig, info, device: torch.device):
    """The model and rule of ``cfg``, seeded: every process (and every resume) builds the same init."""
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, input_shape=info.shape, num_classes=info.num_classes, **cfg.model_options)
    rule = rules.build(cfg.rule, model, info.num_classes, **cfg.rule_arguments()).to(device)
    if cfg.compile:
        rule.compile()
    return rule


def build_run(cfg: RunConfig, info, device: torch.device):
    """Rule, optimizer and scheduler of ``cfg`` in one process."""
    rule = build_rule(cfg, info, device)
    opt = make_optimizer(cfg, rule.param_groups(local_lr=cfg.local_lr))
    return rule, opt, make_scheduler(cfg, opt)


@torch.no_grad()
def evaluate(model: torch.nn.Module, imageset, splits, device, batch_size: int) -> float | None:
    if len(imageset) == 0:
        return None
    correct = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(model):
        for xb, yb in data.batches(imageset, batch_size, shuffle=False):
            x = splits.normalize(xb.to(device, non_blocking=True))
            correct += (model(x).argmax(-1) == yb.to(device)).sum()
    return correct.item() / len(imageset)


class EpochTotals(NamedTuple):
    """One epoch over every process (what the main process writes into the metrics row)."""

    loss_sum: float  # sum over samples of the step loss
    correct: int | None  # right training predictions (at each step's weights), if anyone saw them
    seen: int
    steps: int
    seconds: float
    metrics: dict[str, float]  # rule.step_metrics() averaged over steps
    saved_for_backward_bytes: int | None = None
    peak_memory_bytes: int | None = None
    stage_busy_s: list[float] | None = None  # pipeline: per stage
    stage_wait_s: list[float] | None = None


class Strategy:
    """Where the steps of one run happen, seen from one process. :class:`SingleProcess` is the base."""

    name = "none"
    #: callbacks' ``around_step`` wraps ``rule.step`` in this process (not for the pipeline)
    steps_whole_rule = True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.rank, self.world_size = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def run(cls, cfg: RunConfig, *, resume: bool = False, progress: bool = True,
            callbacks: Sequence[Callback] = ()) -> dict[str, Any] | None:
        """Start the run (spawning processes if the strategy needs them); the main process's summary."""
        return Trainer(cfg, cls(cfg), callbacks, progress).fit(resume)

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.device)

    def load_data(self, load: Callable[[], Any]):
        """``(splits or None, DataInfo)``: the data where batches or evaluation need it."""
        splits = load()
        return splits, DataInfo(tuple(splits.shape), splits.num_classes, len(splits.train))

    def prepare(self, rule, checkpoint: dict | None) -> None:
        """After the rule is built (and the checkpoint's weights loaded): what this process runs."""
        self.rule = rule

    def param_groups(self, rule) -> list[dict]:
        """The optimizer groups of the tensors this process steps."""
        return rule.param_groups(local_lr=self.cfg.local_lr)

    def needs_batches(self) -> bool:
        return True

    # -- every epoch ----------------------------------------------------------------------------

    def before_epoch(self, epoch: int) -> None: ...

    def run_epoch(self, trainer: Trainer, batches: Iterator | None, steps: int, epoch: int,
                  start: EpochProgress | None = None) -> EpochTotals | None:
        """Train one epoch (``start``: the part a cut epoch had done); the totals over every process on
        the main one (None elsewhere, or when a stop was requested: ``trainer.cut`` holds the progress)."""
        loop = EpochLoop(self, trainer)
        totals = loop.run(batches, steps, start)
        trainer.cut = loop.progress
        return totals

    def stop_agreed(self, requested: bool, step: int) -> bool:
        """Whether every process stops after ``step`` (steps done this epoch); one process: when asked."""
        return requested

    def gather_all(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` on the main one, in rank order (a cut's random streams and sums)."""
        return [obj]

    def shard(self, x, y):
        return x, y

    def after_step(self) -> None:
        """After ``rule.step`` filled ``.grad``, before the optimizer (DDP averages gradients here)."""

    def totals(self, loss_sum, correct, seen, extra):
        return loss_sum, correct, seen, extra

    def after_epoch(self) -> None:
        """Before the main process evaluates (DDP: BatchNorm statistics agree on every rank)."""

    # -- state ----------------------------------------------------------------------------------

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` on the main one, in rank order (None elsewhere)."""
        return [obj]

    def share(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        return obj

    def rule_state(self, rule) -> dict[str, torch.Tensor] | None:
        """The whole rule's state on the main process (the pipeline gathers every stage's part)."""
        return rule.state_dict()

    def release(self) -> None:
        """Called by every process after the main one has written an epoch's files."""

    def describe(self) -> dict[str, Any] | None:
        """What the summary records of how the run was split (None: one process)."""
        return None


class SingleProcess(Strategy):
    """One process, the whole rule."""


#: ``cfg.parallel`` -> strategy; :mod:`creditflow.parallel` adds ``ddp`` and ``pipeline``
STRATEGIES: dict[str, type[Strategy]] = {"none": SingleProcess}


def register_strategy(name: str):
    def decorate(cls):
        cls.name = name
        STRATEGIES[name] = cls
        return cls
    return decorate


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True, callbacks: Sequence[Callback] = (),
          overwrite: bool = False, extend: bool = False, restart: bool = False) -> dict[str, Any] | None:
    """Train ``cfg`` to the end and return the summary.

    The run folder is claimed first (:func:`~creditflow.train.runfolder.claim`): locked for this
    process, refused if it holds another run (unless ``overwrite``). A folder holding this run
    already continues it, as a requeued job expects: a finished run is read back, an unfinished one
    resumes from its checkpoint (``resume`` asks for that explicitly; ``restart`` starts it over,
    replacing its files). ``extend``: continue a run with more ``epochs``, the rest of its config
    unchanged.
    """
    cfg = cfg.model_copy(update={"out": str(cfg.out_dir())})  # config.yaml records where the run is
    if extend:
        if cfg.schedule == "cosine":  # its period is the epoch count: a longer run is another schedule
            raise ValueError("--extend cannot lengthen a cosine schedule (its period is --epochs); start a new run")
    if cfg.parallel not in STRATEGIES:  # importing creditflow registers ddp and pipeline (creditflow.parallel)
        raise ValueError(f"no strategy {cfg.parallel!r} registered; available: {', '.join(sorted(STRATEGIES))}")
    # one process claims the folder: this one, or rank 0 of a torchrun launch (every rank runs train())
    owner = int(os.environ.get("RANK", "0")) == 0
    out = cfg.out_dir()
    with (claim(out, cfg, resume=resume or extend, overwrite=overwrite, extend=extend, restart=restart)
          if owner else contextlib.nullcontext()):
        if not (overwrite or restart):
            if not extend and (done := finished_summary(out, cfg.epochs)) is not None:
                if owner:
                    log.info("%s holds a finished run (%d epochs): read back, nothing to train (--restart trains "
                             "it again)", out, cfg.epochs)
                return done
            if not resume and (out / "checkpoint.pt").is_file():
                if owner:
                    log.info("%s holds an unfinished run of this config: resuming it (--restart starts it over)", out)
                resume = True
        return STRATEGIES[cfg.parallel].run(cfg, resume=resume, progress=progress, callbacks=callbacks)


class Trainer:
    """One process's side of a run: ``Trainer(cfg, strategy).fit(resume)``."""

    def __init__(self, cfg: RunConfig, strategy: Strategy, callbacks: Sequence[Callback] = (),
                 progress: bool = True):
        self.cfg, self.strategy = cfg, strategy
        self.memory = SavedActivations() if strategy.steps_whole_rule else None
        self.callbacks = [*([self.memory] if self.memory else []), *callbacks]
        self.progress = progress and strategy.is_main
        self.rule = self.optimizer = self.scheduler = None
        self.precision = Precision("fp32", torch.device("cpu"))  # fit() sets the run's
        self.global_step = 0
        self._bar = None

    # -- what strategies call ---------------------------------------------------------------------

    def step_started(self, step: int | None = None) -> None:
        """Callbacks' ``on_step_start``; ``step``: the global step, where a strategy counts them itself."""
        if step is not None:
            self.global_step = step
        for cb in self.callbacks:
            cb.on_step_start(self, self.global_step)

    def step(self, n: int, x, y):
        """One ``rule.step`` on this process's batch, through every callback's ``around_step``."""
        self.step_started()
        def run():
            scaled = {"scale": self.precision.scale()} if self.precision.scaler is not None else {}  # fp16
            with self.precision.autocast():
                return self.rule.step(x, y, **scaled)

        for cb in reversed(self.callbacks):
            run = (lambda cb=cb, inner=run: cb.around_step(self, self.global_step, x, y, inner))
        return run()

    def observe_loss(self, loss: torch.Tensor) -> None:
        """After each step (before :meth:`advance`): a diverged loss stops the run at the next check."""
        self.watch.observe(self.global_step, loss)
        if (self.global_step + 1) % DIVERGENCE_CHECK_EVERY == 0:
            self.check_divergence()

    def check_divergence(self, found: tuple[int, float, float] | None = None) -> None:
        """Raise :class:`Diverged` for the first bad step seen (``found``: reported by the strategy)."""
        found = found or self.watch.check()
        if found is None:
            return
        step, loss, first = found
        epoch, within = divmod(step, self.steps_per_epoch)
        done = self.epochs_done
        kept = f"the checkpoint of epoch {done} is kept" if done else "no checkpoint was written"
        where = f"epoch {epoch + 1} step {within + 1}"
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"{where}: training loss is {loss}; stopped, {kept} (try a smaller --lr)")
        raise Diverged(f"{where}: training loss {loss:.4g} is over {self.cfg.divergence_factor:g} times the first "
                       f"step's {first:.4g}; stopped, {kept} (try a smaller --lr, or --divergence-factor 0 to "
                       "train on)")

    def advance(self, steps: int = 1) -> None:
        self.global_step += steps
        if self._bar is not None:
            self._bar.update(steps)

    def saved_bytes(self) -> int | None:
        return self.memory.value if self.memory is not None else None

    # -- the run ----------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict[str, Any] | None:
        """Train to ``cfg.epochs`` (``resume``: from the folder's checkpoint, mid-epoch too).

        On SIGTERM/SIGINT (every strategy) the run stops after the step in progress, writes
        a checkpoint of that point and raises :class:`~creditflow.train.preemption.Preempted`.
        """
        with stop_signals() as self.stop:
            return self._fit(resume)

    def _fit(self, resume: bool) -> dict[str, Any] | None:
        self._start(resume)
        for epoch in range(self.epochs_done, self.cfg.epochs):
            self._epoch(epoch)
        return self._finish()

    def _start(self, resume: bool) -> None:
        """Data, rule, optimizer, the checkpoint's state where one is resumed; config.yaml written."""
        cfg, strategy = self.cfg, self.strategy
        main = strategy.is_main
        out = cfg.out_dir()
        ckpt_path = out / "checkpoint.pt"
        self.device = strategy.device
        if cfg.deterministic:
            use_deterministic_algorithms()
        splits, info = strategy.load_data(lambda: data.load(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                                                            val_fraction=cfg.val_fraction, seed=cfg.seed))
        self.splits = splits
        rule = self.rule = build_rule(cfg, info, self.device)
        ckpt = None
        if main and resume and ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path, "cpu")
            check_resumable(ckpt["config"], cfg, out)
        elif main and resume:
            log.info("nothing to resume in %s; starting fresh", out)
        ckpt = strategy.share(ckpt)  # rank 0 reads, every process resumes
        if ckpt is not None:
            rule.load_state_dict(ckpt["rule"])
        strategy.prepare(rule, ckpt)
        groups = strategy.param_groups(rule)
        self.optimizer = make_optimizer(cfg, groups) if groups else None  # None: frozen units only
        self.scheduler = make_scheduler(cfg, self.optimizer) if self.optimizer is not None else None
        self.precision = Precision(cfg.precision, self.device)
        gen = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation, saved in checkpoints
        start, rows, within = 0, [], None
        if ckpt is not None:
            self._load_process_state(ckpt, strategy.rank)
            gen.set_state(ckpt["generator"])
            start = ckpt["epoch"]
            within = ckpt.get("within")  # a checkpoint written at a signal, inside epoch start + 1
            # a kill between the metrics and the checkpoint leaves a row the checkpoint never saw
            rows = read_jsonl(out / "metrics.jsonl")[:start] if main else []
            if main:
                at = f" step {within['ranks'][0]['progress']['steps'] + 1}" if within else ""
                log.info("resuming %s at epoch %d%s", out, start + 1, at)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "config.yaml", dump_yaml(cfg) + data_comment(splits))
        steps = math.ceil(info.train_size / cfg.batch_size)
        if cfg.max_steps_per_epoch:
            steps = min(steps, cfg.max_steps_per_epoch)
        self.global_step = start * steps + (within["ranks"][0]["progress"]["steps"] if within else 0)
        self.steps_per_epoch, self.epochs_done = steps, start
        self.watch = DivergenceWatch(cfg.divergence_factor, self.device, (ckpt or {}).get("initial_loss"))
        # On CUDA the training set lives on the device (uint8: CIFAR-10 is 150 MB), so a batch is an
        # index into it, not a pageable host-to-device copy per step.
        self.train_set = None if splits is None else splits.train.to(self.device) if self.device.type == "cuda" else splits.train
        self.out, self.ckpt_path, self.gen, self.rows, self.within = out, ckpt_path, gen, rows, within
        self.augment = data.augment.build(cfg.augment)
        for cb in self.callbacks:
            cb.on_fit_start(self)

    def _batches(self, skip: int = 0, resumed_state=None):
        """One epoch's normalised, augmented batches from the run's generator."""
        cfg, gen, splits = self.cfg, self.gen, self.splits
        # skip: batches a cut epoch had done; its permutation is drawn again from the epoch's first
        # generator state, and then the generator goes on from where the cut left it
        for i, (xb, yb) in enumerate(data.batches(self.train_set, cfg.batch_size, shuffle=True, generator=gen,
                                                  skip=skip)):
            if i == 0 and resumed_state is not None:
                gen.set_state(resumed_state)
            x, y = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            x = self.augment(x, generator=gen)  # the whole batch: every rank draws the same augmentation
            yield splits.normalize(x), y

    def _epoch(self, epoch: int) -> None:
        """One epoch: its steps, the main process's evaluation, metrics row and checkpoint."""
        cfg, strategy, rule, steps = self.cfg, self.strategy, self.rule, self.steps_per_epoch
        main, out, ckpt_path, gen, rows = strategy.is_main, self.out, self.ckpt_path, self.gen, self.rows
        strategy.before_epoch(epoch)
        for cb in self.callbacks:
            cb.on_epoch_start(self, epoch)
        progress = None
        if (within := self.within) is not None:  # the first epoch resumes inside, from the cut
            self.within = None
            mine = within["ranks"][strategy.rank]
            progress = EpochProgress(**mine["progress"])
            torch.set_rng_state(mine["torch_rng"])  # after before_epoch, which may reseed a rank
            if mine["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
            epoch_start, resumed_state = within["epoch_generator"], gen.get_state()
            gen.set_state(epoch_start)
        else:
            epoch_start, resumed_state = gen.get_state(), None
        self._bar = tqdm(total=steps, initial=progress.steps if progress else 0,
                         desc=f"{cfg.rule} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not self.progress)
        batches = (self._batches(progress.steps if progress else 0, resumed_state)
                   if strategy.needs_batches() else None)
        self.cut = None
        totals = strategy.run_epoch(self, batches, steps, epoch, progress)
        if self.cut is not None:  # a signal: a checkpoint of this step, then out
            self._bar.close()
            self._bar = None
            self._write_cut(ckpt_path, epoch, steps, gen, epoch_start)
        if main:  # the rest of the epoch since the last check (the pipeline's every stage, gathered)
            self.check_divergence()
        self._bar.close()
        self._bar = None
        if self.scheduler is not None:
            self.scheduler.step()
        strategy.after_epoch()
        state = self._process_state()
        states = strategy.gather(state)
        rule_state = strategy.rule_state(rule)
        if not main:
            strategy.release()
            self.epochs_done = epoch + 1  # rank 0 has written its checkpoint
            self._stop_after_epoch(epoch, steps)
            return
        row = self._row(epoch, totals, rows)
        rows.append(row)
        for cb in self.callbacks:
            cb.on_epoch_end(self, row)
        # metrics first: a kill before the checkpoint is renamed in leaves an extra row that
        # resume drops; the other order would lose the row of the epoch the checkpoint holds
        write_jsonl(out / "metrics.jsonl", rows)
        save_checkpoint(ckpt_path, {
            "epoch": epoch + 1, "config": cfg.model_dump(mode="json"), "rule": rule_state,
            "generator": gen.get_state(), "processes": states, "strategy": strategy.describe(),
            "initial_loss": self.watch.initial_loss(),
        })
        strategy.release()
        self.epochs_done = epoch + 1
        # rule and seed on every line: compare interleaves many runs in one log
        log.info("%s seed %d epoch %d/%d: loss %.4f, accuracy train %s val %s test %s", cfg.rule, cfg.seed,
                 row["epoch"], cfg.epochs, row["train_loss"], _fmt(row["train_acc"]), _fmt(row["val_acc"]),
                 _fmt(row["test_acc"]))
        self._stop_after_epoch(epoch, steps)

    def _finish(self) -> dict[str, Any] | None:
        """summary.json and the curves (the main process); every process returns the summary."""
        cfg, strategy, rows, out, splits = self.cfg, self.strategy, self.rows, self.out, self.splits
        summary = None
        if strategy.is_main:
            summary = summarize(rows, cfg.model_dump(mode="json"))
            summary["data"] = {"origin": splits.origin, "files": list(splits.files)}
            if strategy.describe() is not None:
                summary[strategy.name] = strategy.describe()
            write_summary(out / "summary.json", summary)
            plot_curves({cfg.rule: rows}, out / "curves.png", f"{cfg.rule} on {cfg.dataset}")  # with matplotlib
        for cb in self.callbacks:
            cb.on_fit_end(self, summary)
        return strategy.share(summary)  # every process returns it (torchrun: each is a CLI that reports)

    def _stop_after_epoch(self, epoch: int, steps: int) -> None:
        """A signal on an epoch's last steps: its checkpoint is written; stop there (not after the last)."""
        if epoch + 1 < self.cfg.epochs and self.strategy.stop_agreed(self.stop.requested, 0):
            raise Preempted(self.stop.signum or signal.SIGTERM, self.cfg.out_dir(), epoch + 1, self.steps_per_epoch,
                            self.steps_per_epoch)

    def _write_cut(self, ckpt_path, epoch: int, steps: int, gen: torch.Generator, epoch_start: torch.Tensor):
        """The checkpoint of a run stopped by a signal inside ``epoch``, then :class:`Preempted`."""
        strategy, cut = self.strategy, self.cut
        self.check_divergence()  # a diverged state is not worth resuming: Diverged names the kept epoch
        states = strategy.gather(self._process_state())
        ranks = strategy.gather_all({  # each process's own place in the epoch and random stream
            "progress": cut._asdict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None})
        rule_state = strategy.rule_state(self.rule)
        if strategy.is_main:
            for cb in self.callbacks:
                cb.on_checkpoint(self)
            save_checkpoint(ckpt_path, {
                "epoch": epoch, "config": self.cfg.model_dump(mode="json"), "rule": rule_state,
                "generator": gen.get_state(), "processes": states, "strategy": strategy.describe(),
                "initial_loss": self.watch.initial_loss(),
                "within": {"epoch_generator": epoch_start, "ranks": ranks},
            })
        strategy.release()
        raise Preempted(self.stop.signum or signal.SIGTERM, ckpt_path.parent, epoch + 1, cut.steps, steps)

    def _row(self, epoch: int, t: EpochTotals, earlier: list[dict[str, Any]]) -> dict[str, Any]:
        train_loss = t.loss_sum / max(t.seen, 1)
        if not math.isfinite(train_loss):
            kept = (f"the checkpoint of epoch {epoch} is kept" if epoch else "no checkpoint was written")
            raise NonFiniteLoss(f"epoch {epoch + 1}: training loss is {train_loss}; stopped, {kept} "
                                "(try a smaller --lr)")
        model = self.rule.model
        row = {"epoch": epoch + 1, "train_loss": train_loss,
               "train_acc": t.correct / max(t.seen, 1) if t.correct is not None else None,
               "seconds_per_step": t.seconds / max(t.steps, 1),
               "samples_per_second": t.seen / t.seconds if t.seconds > 0 else None,
               "saved_for_backward_bytes": t.saved_for_backward_bytes, "peak_memory_bytes": t.peak_memory_bytes,
               "stage_busy_s": t.stage_busy_s, "stage_wait_s": t.stage_wait_s,
               **dict(sorted(t.metrics.items()))}
        row["val_acc"] = evaluate(model, self.splits.val, self.splits, self.device, self.cfg.eval_batch_size)
        row["test_acc"] = None
        if self._test_now(row, earlier):
            row["test_acc"] = evaluate(model, self.splits.test, self.splits, self.device, self.cfg.eval_batch_size)
        row["lr"] = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else self.cfg.lr
        return row

    def _test_now(self, row: dict[str, Any], earlier: list[dict[str, Any]]) -> bool:
        """Whether this epoch's test accuracy can be reported: every epoch, or (``test_every: best``)
        only where the summary may read it, a new best validation epoch or the last one."""
        if self.cfg.test_every == "epoch" or row["val_acc"] is None or row["epoch"] >= self.cfg.epochs:
            return True
        return all(row["val_acc"] > r["val_acc"] for r in earlier)  # earliest on ties, as select_best

    # -- per-process state: optimizer (by parameter name), scheduler, RNG ----------------------------

    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.rule.named_parameters()}

    def _process_state(self) -> dict[str, Any]:
        opt = None
        if self.optimizer is not None:
            opt = named_optimizer_state(self.optimizer, self._names())
        return {"optimizer": opt, "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.precision.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def _load_process_state(self, ckpt: dict, rank: int) -> None:
        states = ckpt["processes"]
        mine = states[rank] if len(states) > rank else states[0]
        if self.optimizer is not None:
            # every process's optimizer state, by parameter name: a split that differs from the
            # saved one (another --stages) still finds each tensor's moments
            saved = [s["optimizer"] for s in states if s["optimizer"] is not None]
            named = {k: v for s in saved for k, v in s["state"].items()}
            groups = {"groups": [g for s in saved for g in s["groups"]]}
            load_named_optimizer_state(self.optimizer, named, groups, self._names())
        if self.scheduler is not None and mine["scheduler"] is not None:
            self.scheduler.load_state_dict(mine["scheduler"])
        self.precision.load_state_dict(mine.get("scaler"))
        if rank < len(states):  # its own random stream (another split: rank 0's at least)
            torch.set_rng_state(mine["torch_rng"])
            if mine.get("cuda_rng") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda_rng"], self.device)


def check_resumable(saved: dict[str, Any], cfg: RunConfig, out) -> None:
    """One-line ValueError naming the keys in which ``cfg`` differs from the run checkpointed in ``out``.

    ``epochs`` may differ: :func:`train` let it (``--extend``) or refused it, from ``config.yaml``.
    """
    diff = config_diff(saved, cfg, PLACEMENT_KEYS | {"epochs"})
    if diff:
        raise ValueError(f"cannot resume {out}: its checkpoint's config differs in {', '.join(diff)}; use the "
                         "saved config.yaml or another --out")


def data_comment(splits) -> str:
    """Comment lines for config.yaml naming the data files this start read (YAML ignores them)."""
    lines = [f"# data read: {f['path']} ({f.get('files', 1)} file{'s' if f.get('files', 1) > 1 else ''}, "
             f"{f['bytes']} bytes, sha256 {f['sha256']})" for f in splits.files]
    return "".join(line + "\n" for line in lines)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


__all__ = ["Callback", "DataInfo", "Diverged", "EXPECTED_ERRORS", "EpochTotals", "NonFiniteLoss", "STRATEGIES", "SingleProcess", "Strategy",
           "Trainer", "build_rule", "build_run", "evaluate", "make_optimizer", "make_scheduler", "register_strategy",
           "resolve_device", "train"]
