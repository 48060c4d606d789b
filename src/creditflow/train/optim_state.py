"""The optimizer and scheduler of a run, and optimizer state saved by parameter name.

By name, not by position: a pipeline resumed with another ``--stages`` builds other param groups on
each process, and every tensor still finds its moments.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import RunConfig


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


def named_optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """``opt.state_dict()`` keyed by parameter name: ``{"state": {name: ...}, "groups": [hyperparameters]}``."""
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {names[id(params[i])]: v for i, v in sd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "names": [names[id(params[i])] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "groups": groups}


def load_named_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any], saved: dict[str, Any] | None,
                               names: dict[int, str]) -> None:
    """Load per-parameter state by name into ``opt`` (whose groups may hold other parameters than
    the saved ones); each group takes the hyperparameters of the saved group holding its first tensor."""
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    sd["state"] = {i: state[names[id(p)]] for i, p in enumerate(params) if names[id(p)] in state}
    if saved is not None:
        for g in sd["param_groups"]:
            first = names[id(params[g["params"][0]])]
            source = next((s for s in saved["groups"] if first in s["names"]), None)
            if source is not None:
                g.update({k: v for k, v in source.items() if k != "names"})
    opt.load_state_dict(sd)


__all__ = ["load_named_optimizer_state", "make_optimizer", "make_scheduler", "named_optimizer_state"]
