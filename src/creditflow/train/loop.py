"""The training loop: one rule, one model, one dataset; resumable and honest about selection.

Per epoch it appends a line to ``metrics.jsonl`` and atomically rewrites ``checkpoint.pt``;
``summary.json`` reports test accuracy at the best *validation* epoch.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import data, models, rules
from ..diagnostics import saved_tensor_bytes
from .checkpoint import load_checkpoint, save_checkpoint, write_text
from .config import RunConfig, dump_yaml
from .metrics import read_jsonl, summarize, write_jsonl, write_summary

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/Inf loss; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    """``params``: tensors or param groups (``rule.param_groups``)."""
    params = list(params)
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    # The fused kernels do the same update in one pass; on CPU PyTorch's default is a per-tensor
    # loop that costs as much as DFA's whole backward on an MLP (docs/benchmarks.md).
    fused = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in tensors)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           fused=fused)


def make_scheduler(cfg: RunConfig, opt: torch.optim.Optimizer):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


def build_run(cfg: RunConfig, splits, device: torch.device):
    """Model, rule, optimizer and scheduler for ``cfg``, seeded so rebuilding gives the same init."""
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, input_shape=splits.shape, num_classes=splits.num_classes,
                         **cfg.model_options)
    rule = rules.build(cfg.rule, model, splits.num_classes, **cfg.rule_arguments()).to(device)
    opt = make_optimizer(cfg, rule.param_groups(local_lr=cfg.local_lr))
    return rule, opt, make_scheduler(cfg, opt)


@torch.no_grad()
def evaluate(model: torch.nn.Module, imageset, splits, device, batch_size: int) -> float | None:
    if len(imageset) == 0:
        return None
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    for xb, yb in data.batches(imageset, batch_size, shuffle=False):
        x = splits.normalize(xb.to(device, non_blocking=True))
        correct += (model(x).argmax(-1) == yb.to(device)).sum()
    model.train(was_training)
    return correct.item() / len(imageset)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` to the end (or continue it with ``resume``) and return the summary."""
    if cfg.parallel == "ddp":
        from ..parallel.ddp import train_ddp

        return train_ddp(cfg, resume=resume, progress=progress)
    if cfg.parallel == "pipeline":
        from ..parallel.pipeline import train_pipeline

        return train_pipeline(cfg, resume=resume, progress=progress)
    return run_training(cfg, resume=resume, progress=progress)


def run_training(cfg: RunConfig, *, resume: bool = False, progress: bool = True, sync=None) -> dict[str, Any] | None:
    """The trainer. ``sync`` (``creditflow.parallel.ddp.DataParallel``): this process is one rank of a
    data-parallel run; only rank 0 evaluates and writes files, the others return None."""
    main = sync is None or sync.is_main
    out = cfg.out_dir()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    device = resolve_device(cfg.device) if sync is None else sync.device

    def load():
        return data.load(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download,
                         val_fraction=cfg.val_fraction, seed=cfg.seed)

    splits = load() if sync is None else sync.main_first(load)  # one download, not one per rank
    rule, opt, sched = build_run(cfg, splits, device)
    if sync is not None:
        sync.prepare(rule)
    augment = data.augment.build(cfg.augment)
    gen = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation, saved in checkpoints
    rows: list[dict[str, Any]] = []
    start = 0
    state = load_checkpoint(ckpt_path, device if sync is None else "cpu") if (
        main and resume and ckpt_path.exists()) else None
    if sync is not None:
        state = sync.share(state)  # rank 0 reads, every rank resumes
    if state is not None:
        if state["config"] != cfg.model_dump(mode="json"):
            raise ValueError(f"cannot resume {out}: its config differs from this one; "
                             "use the saved config.yaml or another --out")
        rule.load_state_dict(state["rule"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start = state["epoch"]
        rows = read_jsonl(out / "metrics.jsonl")[:start] if main else []
        if main:
            log.info("resuming %s at epoch %d", out, start + 1)
    elif resume and main:
        log.info("nothing to resume in %s; starting fresh", out)
    if main:
        write_text(out / "config.yaml", dump_yaml(cfg))

    steps = math.ceil(len(splits.train) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    for epoch in range(start, cfg.epochs):
        if sync is not None:
            sync.seed(epoch)
        row = train_epoch(rule, opt, splits, augment, gen, cfg, device, steps, epoch, progress and main, sync=sync)
        if sched is not None:
            sched.step()
        if sync is not None:
            sync.sync_buffers()  # BatchNorm statistics agree on every rank before rank 0 evaluates
            if not main:
                continue
        row["val_acc"] = evaluate(rule.model, splits.val, splits, device, cfg.eval_batch_size)
        row["test_acc"] = evaluate(rule.model, splits.test, splits, device, cfg.eval_batch_size)
        row["lr"] = opt.param_groups[0]["lr"]
        rows.append(row)
        save_checkpoint(ckpt_path, {
            "epoch": epoch + 1, "config": cfg.model_dump(mode="json"), "rule": rule.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
        })
        write_jsonl(out / "metrics.jsonl", rows)
        log.info("epoch %d: loss %.4f train %.4f val %s test %.4f", row["epoch"], row["train_loss"],
                 row["train_acc"], row["val_acc"], row["test_acc"])
    if not main:
        return None
    summary = summarize(rows, cfg.model_dump(mode="json"))
    write_summary(out / "summary.json", summary)
    return summary


def train_epoch(rule, opt, splits, augment, gen, cfg, device, steps, epoch, progress, sync=None) -> dict[str, Any]:
    """One epoch; with ``sync`` each rank steps on its shard of every batch and gradients are averaged."""
    rule.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = n_steps = 0
    extra_sums: dict[str, torch.Tensor] = {}  # rule.step_metrics(), summed on device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=steps, desc=f"{cfg.rule} epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not progress)
    start = time.perf_counter()
    batches = data.batches(splits.train, cfg.batch_size, shuffle=True, generator=gen)
    for xb, yb in batches:
        if n_steps == steps:
            break
        x, y = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        x = augment(x, generator=gen)  # the whole batch: every rank draws the same augmentation
        if sync is not None and (shard := sync.shard(x, y)) is None:
            continue  # a last batch smaller than the number of ranks: skipped on every rank
        x, y = (x, y) if sync is None else shard
        x = splits.normalize(x)
        if n_steps == 0:  # measure once per epoch: the hooks cost time, the number does not move
            held = {}
            saved = saved_tensor_bytes(lambda: held.setdefault("out", rule.step(x, y)), exclude=rule)
            out = held["out"]
        else:
            out = rule.step(x, y)
        if sync is not None:
            sync.after_step()  # average .grad (and rule-owned state) over ranks
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += out.loss * len(y)  # kept on device: no sync in the hot loop
        correct += (out.logits.argmax(-1) == y).sum()
        for name, value in rule.step_metrics().items():
            extra_sums[name] = extra_sums.get(name, 0) + value.detach().float()
        seen += len(y)
        n_steps += 1
        bar.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    if sync is not None:  # loss and accuracy over the global batches, step metrics averaged over ranks
        loss_sum, correct, seen, extra_sums = sync.totals(loss_sum, correct, seen, extra_sums)
    train_loss = loss_sum.item() / max(seen, 1)
    if not math.isfinite(train_loss):
        raise NonFiniteLoss(f"epoch {epoch + 1}: training loss is {train_loss}; stopped, the last good "
                            f"checkpoint is kept (try a smaller --lr)")
    return {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": correct.item() / max(seen, 1),
            "seconds_per_step": seconds / max(n_steps, 1),
            "saved_for_backward_bytes": saved, "peak_memory_bytes": peak_memory(device),
            **{name: total.item() / max(n_steps, 1) for name, total in extra_sums.items()}}
