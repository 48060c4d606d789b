"""The external-memory-access model of the ASAP thesis (Woo 2023, ch. 6; after Mostafa et al.).

On-chip memory is assumed to buffer one layer's input and output; everything else goes through
external memory:

    forward:  (reads, writes) = (Param, Act)              (eq. 6.1)
    backward: (reads, writes) = (Param + Act, Param)      (eq. 6.2; the thesis prints "Aaram")

``Param`` counts the trained weights; ``Act`` counts the activations a rule keeps for its
backward, which is where rules differ: BP keeps every weight layer's input, activation sharing
keeps only the shared ones. ``Act`` is read off the model, not assumed: a forward pass records,
for every Linear/Conv2d (plain or feedback layer), the tensor that will feed its weight gradient
(its input, or the activation the rule's feedback policy hands it: mechanisms/feedback.py,
``observe_weight_inputs``), and distinct storages are summed.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..mechanisms.feedback import FeedbackLayer, observe_weight_inputs
from ..mechanisms.modes import probe_batch
from ..report import figure_class, fmt, markdown_table, save_figure

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)  # feedback layers are these too


@dataclass(frozen=True)
class MemoryAccess:
    """Element counts (not bytes) of one training step of a batch.

    ``params`` counts every trained weight, a trained feedback ``B`` (KP, ASAP) included;
    ``feedback_params`` is that ``B``'s share. The thesis's Fig. 6.1 shows ASAP below BP, which
    holds only if ``B`` is not counted: :attr:`total_forward_weights_only` is that accounting.
    """

    params: int
    activations: int
    feedback_params: int = 0

    @property
    def forward_reads(self) -> int:
        return self.params

    @property
    def forward_writes(self) -> int:
        return self.activations

    @property
    def backward_reads(self) -> int:
        return self.params + self.activations

    @property
    def backward_writes(self) -> int:
        return self.params

    @property
    def total(self) -> int:
        return self.forward_reads + self.forward_writes + self.backward_reads + self.backward_writes

    @property
    def total_forward_weights_only(self) -> int:
        """:attr:`total` with ``Param`` counting the forward weights alone (each Param term minus ``B``)."""
        return self.total - 3 * self.feedback_params

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "forward_reads": self.forward_reads, "forward_writes": self.forward_writes,
                "backward_reads": self.backward_reads, "backward_writes": self.backward_writes, "total": self.total,
                "total_forward_weights_only": self.total_forward_weights_only}


def weight_gradient_inputs(rule: nn.Module, x: torch.Tensor) -> int:
    """Elements of the distinct tensors that feed the weight layers' gradients in one step on ``x``.

    The step runs on a copy of the rule (a rule may choose a layer's activation during its own
    step, as activation sharing does), with targets of class 0; the rule is left untouched.
    """
    rule = copy.deepcopy(rule)
    model = rule.model
    seen: dict[int, int] = {}

    def record(module, a):
        if any(p.requires_grad for p in module.parameters()):
            key = a.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), a.numel())

    # Feedback layers report what their weight gradient reads (a shared activation, under the rule's
    # policy); plain layers (BP) read their input.
    handles = [m.register_forward_hook(lambda m, inputs, out: record(m, inputs[0])) for m in model.modules()
               if isinstance(m, WEIGHT_LAYERS) and not isinstance(m, FeedbackLayer)]
    try:
        with observe_weight_inputs(record):
            rule.step(x, torch.zeros(len(x), dtype=torch.long, device=x.device))
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values())


def external_memory_access(rule: nn.Module, input_shape, batch_size: int = 1) -> MemoryAccess:
    """The thesis's access counts for one training step of ``rule`` on ``batch_size`` inputs."""
    params = sum(p.numel() for p in rule.model.parameters() if p.requires_grad)
    feedback = sum(m.feedback.numel() for m in rule.model.modules()
                   if isinstance(m, FeedbackLayer) and m.feedback.requires_grad)
    x = probe_batch(rule.model, input_shape, batch_size)
    return MemoryAccess(params=params, activations=weight_gradient_inputs(rule, x), feedback_params=feedback)


def _under(context, fn):
    with context():
        return fn()


def memory_table(model: str, rules: list[str], batch_size: int = 64, num_classes: int = 10,
                 device: str = "cpu", model_options: dict | None = None, seed: int = 0,
                 precision: str = "fp32") -> list[dict]:
    """Measured (bytes saved for backward, CUDA peak) and modelled (ch. 6) memory per rule.

    Every rule wraps its own copy of the same seeded model and sees the same random batch;
    ``precision`` ``bf16``/``fp16``: the step runs under autocast (what the trainer's ``--precision`` does).
    """
    from .. import models as model_registry
    from .. import rules as rule_registry
    from ..train.precision import Precision
    from .memory import peak_memory

    rows, x, y = [], None, None
    for name in rules:
        torch.manual_seed(seed)
        net = model_registry.build(model, num_classes=num_classes, **(model_options or {}))
        rule = rule_registry.build_spec(name, net, num_classes).to(device)  # "asap:k=4" carries options
        shape = tuple(getattr(net, "input_shape"))
        if x is None:
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(batch_size, *shape, generator=g).to(device)
            y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        autocast = Precision(precision, torch.device(device)).autocast
        def one_step():  # as a training step after zero_grad(set_to_none=True): .grad allocated afresh
            rule.zero_grad(set_to_none=True)
            return _under(autocast, lambda: rule.step(x, y))

        report = peak_memory(one_step, device, exclude=rule)  # it runs the step twice on CUDA
        access = external_memory_access(rule, shape, batch_size)
        rows.append({"rule": name, "saved_for_backward_bytes": report.saved_for_backward_bytes,
                     "device_peak_bytes": report.device_peak_bytes, **access.as_dict()})
    base = next((r for r in rows if r["rule"] == "bp"), rows[0])
    for r in rows:
        r["saved_vs_bp"] = r["saved_for_backward_bytes"] / base["saved_for_backward_bytes"]
        r["access_vs_bp"] = r["total"] / base["total"]
        r["access_forward_weights_only_vs_bp"] = r["total_forward_weights_only"] / base["total"]
    return rows


def to_markdown(rows: list[dict], model: str, batch_size: int) -> str:

    ref = next((r["rule"] for r in rows if r["rule"] == "bp"), rows[0]["rule"])
    mib = 2.0 ** 20
    counts = ("params", "activations", "forward_reads", "forward_writes", "backward_reads", "backward_writes", "total")
    return "\n".join([
        f"Measured on `{model}`, batch {batch_size} (ratios to {ref}):", "",
        *markdown_table(["rule", "saved for backward MiB", "vs BP", "device peak MiB"], (
            [r["rule"], f"{r['saved_for_backward_bytes'] / mib:.2f}", f"{r['saved_vs_bp']:.2f}x",
             fmt(None if r["device_peak_bytes"] is None else r["device_peak_bytes"] / mib, ".1f")] for r in rows)),
        "", "Modelled external memory accesses (ASAP thesis ch. 6, elements, millions):", "",
        *markdown_table(["rule", "Param", "Act", "fwd reads", "fwd writes", "bwd reads", "bwd writes", "total", "vs BP",
                         "vs BP, B not counted"], (
            [r["rule"], *(f"{r[k] / 1e6:.3f}" for k in counts), f"{r['access_vs_bp']:.2f}x",
             f"{r['access_forward_weights_only_vs_bp']:.2f}x"] for r in rows)),
    ]) + "\n"


def plot_access(rows: list[dict], model: str, path) -> None:
    """A bar chart of modelled accesses per rule, split into forward and backward (thesis Fig. 6.1)."""

    names = [r["rule"] for r in rows]
    fwd = [(r["forward_reads"] + r["forward_writes"]) / 1e6 for r in rows]
    bwd = [(r["backward_reads"] + r["backward_writes"]) / 1e6 for r in rows]
    fig = figure_class("leave out --plot")(figsize=(1.2 * len(rows) + 2, 3.5))
    ax = fig.subplots()
    ax.bar(names, fwd, label="forward (6.1)")
    ax.bar(names, bwd, bottom=fwd, label="backward (6.2)")
    ax.set_ylabel("external memory accesses (M elements)")
    ax.set_title(f"{model}: modelled external memory accesses")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_access_across(tables: dict[str, list[dict]], path) -> None:
    """Thesis Fig. 6.1: modelled accesses of every rule relative to BP, grouped by network.

    ``tables`` maps a model name to its :func:`memory_table` rows (the same rules in each).
    Bars give total accesses / BP's as the thesis counts them (``Param``: forward weights only);
    a cross marks the total when a trained ``B`` counts too, and a dot the measured
    saved-for-backward ratio, so the two accountings and the measurement read side by side.
    """
    models = list(tables)
    rules = [r["rule"] for r in tables[models[0]]]
    width = 0.8 / len(rules)
    fig = figure_class("leave out --plot")(figsize=(1.6 * len(models) + 4.5, 3.8))
    ax = fig.subplots()
    for j, rule in enumerate(rules):
        xs = [i + (j - (len(rules) - 1) / 2) * width for i in range(len(models))]
        rows = [next(r for r in tables[m] if r["rule"] == rule) for m in models]
        bars = ax.bar(xs, [r["access_forward_weights_only_vs_bp"] for r in rows], width, label=rule)
        ax.plot(xs, [r["access_vs_bp"] for r in rows], "x", color="black", markersize=4,
                label="accesses with trained B counted" if j == 0 else None)
        ax.plot(xs, [r["saved_vs_bp"] for r in rows], "o", color="black", markersize=3.5,
                label="measured saved bytes / BP" if j == 0 else None)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(range(len(models)), models)
    ax.axhline(1.0, color="grey", linewidth=0.6)
    ax.set_ylabel("relative to BP")
    ax.set_title("Modelled external memory accesses (bars: B not counted, x: counted), measured saved bytes (dots)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
