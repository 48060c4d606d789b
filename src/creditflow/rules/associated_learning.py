"""Associated Learning (AL): folded components, each trained on its own two losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models.associated import REDUCTIONS, AssociatedNet
from ..registry import MODELS, RULES, register_rule
from .base import Rule, StepResult
from .bp import BP


def al_models() -> str:
    return ", ".join(n for n in MODELS.available() if n.startswith("al-"))


@register_rule("al", summary="associated learning: folded components, each learns a local associated "
               "+ autoencoder loss", paper="Kao & Chen 2021")
class AL(Rule):
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

    #: the model class this rule trains (the trainer and the contract tests read it)
    model_type = AssociatedNet

    def __init__(self, model: nn.Module, num_classes: int, assoc_weight: float = 1.0, ae_weight: float = 1.0,
                 reduction: str = "mean"):
        if not isinstance(model, AssociatedNet):
            raise ValueError(f"rule 'al' needs an associated-learning model ({al_models()}), "
                             f"got {type(model).__name__}")
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

    def step(self, x: Tensor, y: Tensor) -> StepResult:
        p = next(self.model.parameters())
        s, t = x, F.one_hot(y, self.num_classes).to(p.dtype)  # s_0 = x, t_0 = onehot(y): (N, C)
        outs = []
        for component in self.model.components:
            out = component(s, t, self.reduction)  # cuts its inputs: the graph ends at the boundary
            outs.append(out)
            s, t = out.s, out.t
        assoc = torch.stack([o.assoc_loss for o in outs])  # (L,)
        ae = torch.stack([o.ae_loss for o in outs])
        total = self.assoc_weight * assoc.sum() + self.ae_weight * ae.sum()
        total.backward()
        with torch.no_grad():  # weights unchanged until the caller's optimizer steps: eq. 4.8 on this batch
            logits = self.model.decode(outs[-1].bridge.detach())
        self._metrics = {**{f"assoc_loss/{i}": v for i, v in enumerate(assoc.detach(), 1)},
                         **{f"ae_loss/{i}": v for i, v in enumerate(ae.detach(), 1)}}
        return StepResult(total.detach(), logits)

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
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                return self.model.metafeatures(x)
        finally:
            for m, mode in modes:
                m.training = mode


def check_rule_model(rule_name: str, model: nn.Module) -> None:
    """A rule with a ``model_type`` needs that model; an AssociatedNet trains with ``al`` or BP only.

    BP trains an AssociatedNet end to end through its inference path (forward); every other rule
    expects blocks or layers and would misread the folded network.
    """
    rule_cls = RULES.get(rule_name).builder
    needed = getattr(rule_cls, "model_type", None)
    if needed is not None and not isinstance(model, needed):
        raise ValueError(f"rule {rule_name!r} needs an associated-learning model ({al_models()}), "
                         f"got {type(model).__name__}")
    if isinstance(model, AssociatedNet) and needed is None and rule_cls is not BP:
        raise ValueError(f"rule {rule_name!r} cannot train an associated-learning model; use rule 'al' "
                         "(or 'bp' end to end), or the matched BP model (mlp, vanilla-cnn, vgg, resnet20, resnet32)")
