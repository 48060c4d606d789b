"""Difference target propagation: layer-wise targets sent down through learned inverses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..mechanisms import block_output_shapes, run_cut, tap
from ..registry import register_rule
from .base import Rule, _Forward, _is_one, placement, resolve_input_shape

#: activations of the inverses g_i (element-wise; "linear" is the identity)
INVERSE_ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "leaky-relu": nn.LeakyReLU,
                       "elu": nn.ELU, "linear": nn.Identity}
#: modules a hidden block may hold: Linear layers and element-wise, parameter-free maps
MLP_PARTS = (nn.Sequential, nn.Linear, nn.Flatten, nn.Identity, nn.Dropout, nn.ReLU, nn.Tanh, nn.Sigmoid,
             nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus, nn.Hardtanh, nn.ReLU6, nn.SELU, nn.CELU)
REDUCTIONS = ("mean", "sum")


def check_mlp(blocks, shapes) -> None:
    """Every hidden block is ``[Flatten,] Linear, activation`` with a flat output, or a clear error."""
    for i, (block, shape) in enumerate(zip(blocks, shapes)):
        bad = next((m for m in block.modules() if not isinstance(m, MLP_PARTS)), None)
        if bad is not None or len(shape) != 1 or not any(isinstance(m, nn.Linear) for m in block.modules()):
            what = type(bad).__name__ if bad is not None else f"output shape {tuple(shape)}"
            raise ValueError(f"dtp needs an MLP: hidden blocks of [Flatten,] Linear and an element-wise "
                             f"activation with a flat output (e.g. mlp:784-256-256-10); block {i} has {what}")


@register_rule("dtp", summary="difference target propagation: layer targets through learned inverses (MLPs)",
               paper="Lee, Zhang, Fischer & Bengio 2015")
class DTP(Rule):
    """Difference Target Propagation (Lee et al. 2015, Algorithm 1; AL paper's MLP baseline).

    Key: ``h_i = f_i(h_{i-1})`` output of hidden block i = 1..k (``h_0 = x``; model child i-1),
    ``f_i = act(W_i h + b_i)``; the head maps ``h_k`` to the logits; ``L`` the batch-mean loss;
    ``g_i(h) = act_g(V_i h + c_i)`` the learned inverse of ``f_i`` (i = 2..k).

    1. Forward; every block input is detached (``run_cut``).
    2. Head: the true gradient of ``L``. Top target ``ĥ_k = h_k - η̂ dL/dh_k``.
    3. Difference correction, i = k..2: ``ĥ_{i-1} = h_{i-1} + g_i(ĥ_i) - g_i(h_i)`` (no grad).
    4. Inverse loss, i = 2..k: ``||g_i(f_i(h_{i-1} + ε)) - (h_{i-1} + ε)||²``, ``ε ~ N(0, σ²)``;
       ``f_i`` runs without grad, so only ``V_i, c_i`` learn from it.
    5. Layer loss, i = 1..k: ``||f_i(h_{i-1}) - ĥ_i||²`` with ``h_{i-1}, ĥ_i`` fixed: only ``W_i, b_i``.

    Gradient descent on every loss; each is summed over units and, with ``reduction="mean"``
    (Lee et al.'s ``mse``), averaged over the batch. Block 1 has no inverse: a target for ``x`` is
    never used (Lee et al.'s code leaves ``V1`` out). Inverses are ``Linear`` + ``act_g``,
    orthogonal weights and zero biases at init, as their ``rand_ortho``/``zeros``.

    Args:
        target_lr: ``η̂``; it multiplies the gradient of the *batch-mean* loss, as in Lee et al.'s
            code (so the per-sample step is ``η̂/N``). Default 0.327: their MNIST value (batch 100).
        noise: ``σ``; default 0.36, their MNIST value.
        inverse_activation: ``act_g``; default ``"tanh"`` (theirs).
        reduction: ``"mean"`` (default) or ``"sum"`` over the batch, for layer and inverse losses.
        inverse_first: Algorithm 1's order: the rule itself takes one SGD step of size
            ``inverse_lr`` on the inverses, then forms the targets with them; the inverses then
            leave ``parameters()``. Default False: both losses come from one forward, the caller's
            optimizer steps the inverses (``param_groups(local_lr=...)``), so targets use the
            inverses as they were before the step.

    Differences from the paper: Lee et al. train with RMSprop, and their code trains the inverses
    on a whole epoch before the forward weights; here any ``torch.optim`` optimizer steps both
    (``local_lr`` for the inverses). σ is constant (their discrete-network code decays it).
    ``ε`` comes from the global RNG after the forward, one draw per layer i = 2..k in order.

    References: Lee, Zhang, Fischer & Bengio 2015, "Difference Target Propagation", ECML-PKDD,
    Sec. 2.3, Algorithm 1; their Theano code (github.com/donghyunlee/dtp, ``conti_dtp.py``);
    Meulemans et al. 2020 (github.com/meulemansalex/theoretical_framework_for_target_propagation,
    ``lib/dtp_layers.py``: the same target and reconstruction losses in PyTorch); Kao & Chen 2021
    (AL paper), Table 2.
    """

    linear_in_loss = False  # the hidden targets are a non-linear function of e

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy", input_shape=None,
                 target_lr: float = 0.327, noise: float = 0.36, inverse_activation: str = "tanh",
                 reduction: str = "mean", inverse_first: bool = False, inverse_lr: float = 1e-3):
        super().__init__(model, num_classes, loss)
        if not (target_lr > 0 and noise >= 0 and inverse_lr > 0):
            raise ValueError(f"need target_lr > 0, noise >= 0, inverse_lr > 0; got {target_lr}, {noise}, {inverse_lr}")
        if inverse_activation not in INVERSE_ACTIVATIONS:
            raise ValueError(f"unknown inverse_activation {inverse_activation!r}; "
                             f"available: {', '.join(INVERSE_ACTIVATIONS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; available: {', '.join(REDUCTIONS)}")
        blocks = list(model.children())
        if len(blocks) < 2:
            raise ValueError(f"dtp needs an MLP of at least 2 blocks (hidden + head), got {len(blocks)}")
        self._blocks = tuple(blocks)  # a tuple, not submodules: the model owns them
        self._hidden = self._blocks[:-1]
        shapes = block_output_shapes(self._hidden, resolve_input_shape(model, input_shape))
        check_mlp(self._hidden, shapes)
        sizes = [s[0] for s in shapes]  # n_1..n_k
        self.inverse = nn.ModuleList(  # inverse[j] is g_{j+2}: h_{j+2} -> h_{j+1}
            nn.Sequential(nn.Linear(n_out, n_in), INVERSE_ACTIVATIONS[inverse_activation]())
            for n_in, n_out in zip(sizes[:-1], sizes[1:])).to(**placement(model))
        for g in self.inverse:
            nn.init.orthogonal_(g[0].weight)
            nn.init.zeros_(g[0].bias)
        self.target_lr, self.noise, self.reduction = target_lr, noise, reduction
        self.inverse_first, self.inverse_lr = inverse_first, inverse_lr
        self.targets: list[Tensor] = []  # ĥ_1..ĥ_k of the last step, detached
        self._metrics: dict[str, Tensor] = {}

    @classmethod
    def model_refusal(cls, model: nn.Module) -> str | None:
        """Fully connected blocks only: inverses of conv blocks would need another design (AL paper, Table 2)."""
        refusal = super().model_refusal(model)
        if refusal:
            return refusal
        blocks = list(model.children()) if isinstance(model, nn.Sequential) else []
        bad = next((m for b in blocks[:-1] for m in b.modules() if not isinstance(m, MLP_PARTS)), None)
        if len(blocks) < 2 or bad is not None:
            what = f"a {type(bad).__name__}" if bad is not None else f"a {type(model).__name__} of {len(blocks)} blocks"
            return (f"needs an MLP: an nn.Sequential of hidden blocks of [Flatten,] Linear and an element-wise "
                    f"activation, then a head (e.g. mlp:784-256-256-10); got {what}")
        return None

    def self_trained(self) -> list[nn.Parameter]:
        return list(self.inverse.parameters()) if self.inverse_first else []

    def _reduce(self, sq: Tensor) -> Tensor:
        return sq.mean() if self.reduction == "mean" else sq.sum()  # sq: (N,) squared norms

    def inverse_losses(self, hs: list[Tensor]) -> list[Tensor]:
        """Per-sample ``||g_i(f_i(h_{i-1} + ε)) - (h_{i-1} + ε)||²``, i = 2..k, each (N,)."""
        losses = []
        for g, f, h in zip(self.inverse, self._hidden[1:], hs[:-1]):
            c = h.detach() + self.noise * torch.randn_like(h)  # h_{i-1} + ε: (N, n_{i-1})
            with torch.no_grad():
                fc = f(c)  # W_i, b_i get nothing from the inverse loss
            losses.append((g(fc) - c).pow(2).sum(-1))
        return losses

    def train_forward(self, x: Tensor, target: Tensor | None = None):
        self._check_target(target)
        hs = self._compiled(self._run_hidden)(x)  # h_1..h_k, each block's graph starts at its detached input
        top = hs[-1].detach().requires_grad_()
        logits = self._blocks[-1](top)  # the head
        state = _Forward()

        def on_error(e: Tensor):
            # e = dL/dlogits of the caller's loss: the head learns from it as in BP, every backward
            if not state.take_own():
                return e, []
            scale = self._scale
            # dL/dh_k through the head (the engine then sends e through it again for its weights)
            (grad_top,) = torch.autograd.grad(logits, top, e, retain_graph=True)
            # Targets and local losses in the parameters' precision, also after a bfloat16 forward:
            # a difference of two inverses' outputs loses most of its digits in half precision.
            dtype = placement(self.model).get("dtype", grad_top.dtype)
            with torch.autocast(grad_top.device.type, enabled=False):
                self.update_hidden([h.to(dtype) for h in hs], (grad_top if _is_one(scale) else grad_top / scale).to(dtype),
                                   scale)
            return e, []

        return tap(logits, on_error), state

    def _run_hidden(self, x: Tensor) -> list[Tensor]:
        return run_cut(self._hidden, x)

    def update_hidden(self, hs: list[Tensor], grad_top: Tensor, scale) -> None:
        """Steps 2-5 from ``dL/dh_k`` (of the plain loss): targets, then one backward over the losses."""
        inv = self.inverse_losses(hs)
        if self.inverse_first and inv:  # Algorithm 1's order: train g_i, then form targets with it
            params = list(self.inverse.parameters())
            grads = torch.autograd.grad(self._reduce(torch.stack(inv).sum(0)), params)
            with torch.no_grad():
                for p, grad in zip(params, grads):
                    p.add_(grad, alpha=-self.inverse_lr)
        with torch.no_grad():
            t = hs[-1] - self.target_lr * grad_top  # ĥ_k
            targets = [t]
            for g, h_i, h_prev in zip(reversed(self.inverse), reversed(hs[1:]), reversed(hs[:-1])):
                t = h_prev + (g(t) - g(h_i))  # ĥ_{i-1}; the small difference first: ĥ = h when ĥ_i = h_i
                targets.append(t)
            targets.reverse()
        layer = [(h - t).pow(2).sum(-1) for h, t in zip(hs, targets)]  # (N,) each; grads: W_i, b_i
        local = self._reduce(torch.stack(layer).sum(0))
        if inv and not self.inverse_first:
            local = local + self._reduce(torch.stack(inv).sum(0))
        # one backward over every local loss (the graphs share no parameter), inside the caller's
        local.backward(None if _is_one(scale) else torch.ones_like(local) * scale)
        self.targets = targets
        self._metrics = {**{f"target_loss/{i}": l.detach().mean() for i, l in enumerate(layer, 1)},
                         **{f"inverse_loss/{i}": l.detach().mean() for i, l in enumerate(inv, 2)}}

    def step_metrics(self) -> dict[str, Tensor]:
        """Per layer i: mean over the batch of ``||h_i - ĥ_i||²`` and of the inverse loss."""
        return dict(self._metrics)
