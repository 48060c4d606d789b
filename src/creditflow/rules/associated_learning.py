"""Associated Learning (AL): folded components, each trained on its own two losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from ..mechanisms.modes import eval_mode
from ..models.associated import REDUCTIONS
from ..registry import MODELS, register_rule
from .base import UnitRule, UnitsRecord


def al_models() -> str:
    return ", ".join(n for n in MODELS.available() if n.startswith("al-"))


@register_rule("al", summary="associated learning: folded components, each learns a local associated "
               "+ autoencoder loss", paper="Kao & Chen 2021")
class AL(UnitRule):
    """Associated Learning (Kao & Chen 2021, Sec. 4, Fig. 4).

    Model: an :class:`~creditflow.models.associated.AssociatedNet` of components i = 1..L, each
    with encoder f_i, bridge b_i, label encoder g_i and decoder h_i (``al-mlp``, ``al-vgg``, ...).

    1. ``s_0 = x``, ``t_0 = onehot(y)``. For every component, on inputs cut from the one below:
       ``s_i = f_i(s_{i-1})``, ``t_i = g_i(t_{i-1})`` (eqs. 4.1, 4.4).
    2. Associated loss ``||b_i(s_i) - t_i||^2`` with t_i a constant: trains f_i, b_i (eq. 4.3).
    3. Autoencoder loss ``||h_i(t_i) - t_{i-1}||^2``: trains g_i, h_i (eq. 4.6).
    4. One backward over ``sum_i assoc_weight * assoc_i + ae_weight * ae_i`` (eq. 4.7 with
       weights 1): the cuts make it L independent backwards, so this equals one backward per
       component (tests/rules/test_associated_learning.py proves it).
    5. Prediction: ``y_hat = h_1 o ... o h_L o b_L o f_L o ... o f_1 (x)`` (eq. 4.8); class = argmax.

    Args:
        assoc_weight, ae_weight: weights of the two losses (>= 0; the paper: 1 and 1).
        reduction: ``"mean"`` over every element (the authors' code) or ``"sum"`` over features,
            mean over the batch (the paper's ``||.||^2`` per sample).

    ``StepResult.loss`` is the weighted sum of all local losses; ``logits`` is the inference
    output at the step's weights (sigmoid outputs, for train accuracy). ``param_groups(local_lr)``
    gives the label side (g_i, h_i) its own learning rate; the authors use twice the encoders'.

    Differences from the paper: none in the algorithm; see docs/rules.md for the choices it leaves open.
    """

    uses_output_error = False  # every component learns from its own two losses
    hidden_waits_for_error = False
    needs_target = True  # t_0 = onehot(y)
    prediction_runs_down = True  # y_hat comes back down through the decoders h_L .. h_1

    @classmethod
    def model_refusal(cls, model: nn.Module) -> str | None:
        if not getattr(model, "folded", False):
            return f"needs a folded (associated-learning) model, got {type(model).__name__} ({al_models()})"
        return None

    def __init__(self, model: nn.Module, num_classes: int, assoc_weight: float = 1.0, ae_weight: float = 1.0,
                 reduction: str = "mean"):
        if self.model_refusal(model):
            raise ValueError(f"rule 'al' {self.model_refusal(model)}")
        if model.num_classes != num_classes:
            raise ValueError(f"the model's label side has {model.num_classes} classes, the rule {num_classes}")
        for name, w in (("assoc_weight", assoc_weight), ("ae_weight", ae_weight)):
            if not (isinstance(w, (int, float)) and w >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {w!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; available: {', '.join(REDUCTIONS)}")
        super().__init__(model, num_classes, "mse")  # AL has no output loss: its losses are the components'
        self.assoc_weight, self.ae_weight, self.reduction = float(assoc_weight), float(ae_weight), reduction
        self._metrics: dict[str, Tensor] = {}

    # -- units: the components ---------------------------------------------------------------------

    def num_units(self) -> int:
        return len(self.model.components)

    def unit_name(self, i: int) -> str:
        return f"component {i + 1}"

    def unit_modules(self, i: int) -> list[nn.Module]:
        return [self.model.components[i]]

    def first_inputs(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x, F.one_hot(y, self.num_classes).to(x.dtype)  # s_0 = x, t_0 = onehot(y): (N, C)

    def forward_units(self, units, inputs, y):
        s, t = inputs
        outs = []
        for i in units:
            out = self.model.components[i](s, t, self.reduction)  # cuts its inputs: the graph ends at the boundary
            outs.append(out)
            s, t = out.s, out.t
        # Units below the top decode this batch later (eq. 4.8), when their weights may have moved on:
        # they keep the decoders' weights of this forward, so the prediction is the one-process one.
        kept = None if units.stop == self.num_units() else [
            {n: p.detach().clone() for n, p in self.model.components[i].h.named_parameters()} for i in units]
        return UnitsRecord(units, y, outs, None, kept), (s.detach(), t.detach())

    def anchors(self, record):
        return [t for o in record.outputs for t in (o.assoc_loss, o.ae_loss)]

    def unit_gradients(self, record, error, own=True, scale=1.0):
        # Every component's two losses, seeded with their weights: the cuts make it one backward
        # per component; the caller's output error is not used (AL has no output loss).
        assoc = torch.stack([o.assoc_loss.detach() for o in record.outputs])  # (units,)
        ae = torch.stack([o.ae_loss.detach() for o in record.outputs])
        part = self.assoc_weight * assoc.sum() + self.ae_weight * ae.sum()
        first = record.units.start + 1
        self._metrics = {**{f"assoc_loss/{i}": v for i, v in enumerate(assoc, first)},
                         **{f"ae_loss/{i}": v for i, v in enumerate(ae, first)}}
        if not own:
            return [], part
        pairs = [(t, torch.full_like(t, w * scale) if isinstance(scale, (int, float)) else torch.full_like(t, w) * scale)
                 for o in record.outputs for t, w in ((o.assoc_loss, self.assoc_weight), (o.ae_loss, self.ae_weight))]
        return pairs, part

    def prediction(self, record, error):
        """From ``b_L(s_L)`` down through this range's decoders (the weights are still the forward's)."""
        if record.units.stop != self.num_units():
            return None
        with torch.no_grad():
            return self.decode_units(record, record.outputs[-1].bridge.detach())

    @torch.no_grad()
    def decode_units(self, record, t: Tensor) -> Tensor:
        """``h_a o ... o h_b (t)`` over the range's components, at the weights of the record's forward."""
        for j in reversed(range(len(record.units))):
            h = self.model.components[record.units[j]].h
            t = h(t) if record.extra is None else functional_call(h, record.extra[j], (t,))
        return t

    def step_metrics(self) -> dict[str, Tensor]:
        """``assoc_loss/i`` and ``ae_loss/i`` of the last step, unweighted, per component i = 1..L."""
        return dict(self._metrics)

    def param_groups(self, local_lr: float | None = None) -> list[dict]:
        """Encoders and bridges (f_i, b_i), then the label side (g_i, h_i) with ``local_lr`` if given."""
        label = {id(p) for c in self.model.components for p in (*c.g.parameters(), *c.h.parameters())}
        params = list(self.parameters())
        return [{"params": [p for p in params if id(p) not in label]},
                {"params": [p for p in params if id(p) in label], **({"lr": local_lr} if local_lr else {})}]

    def representations(self, x: Tensor) -> dict[str, Tensor]:
        """The inference path's metafeatures (Sec. 5.4): ``s1..sL``, ``bL.j``, ``bL``, ``hL..h1``.

        ``s_i`` are the encoders' outputs, ``bL`` the last bridge's (the estimate of t_L),
        ``h_i`` the decoded estimates of t_{i-1} (``h1``: the prediction). Eval mode, no grad;
        every module's mode is restored afterwards.
        """
        with eval_mode(self), torch.no_grad():
            return self.model.metafeatures(x)

    def inference_model(self) -> nn.Module:
        return self.model.inference_model()
