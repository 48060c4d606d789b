"""Local classifiers: every hidden block learns only from its own classifier's loss."""

from __future__ import annotations

from torch import Tensor, nn

from ..mechanisms import get_loss
from ..mechanisms.local import LinearLocal, freeze
from ..registry import register_rule
from .base import DirectRule, placement


@register_rule("local", summary="local classifiers: each block learns from a fixed random classifier on its output",
               paper="Mostafa, Ramesh & Cauwenberghs 2018")
class LocalClassifier(DirectRule):
    """Learning with local errors from fixed random classifiers (Mostafa et al. 2018).

    Key: ``h_i`` output of hidden block i, ``A_i`` its local classifier (C, n_i), ``y*`` one-hot.

    1. Forward; every block input is cut, so no signal crosses a block boundary.
    2. Local classifier i reads ``h_i``: ``z_i = A_i h_i`` (optionally ``A_i avgpool_k(h_i)``);
       local loss ``L_i = CE(softmax(z_i), y*)``, local error ``e_i = dL_i/dz_i = (p_i - y*)/N``.
    3. Block i receives ``dL_i/dh_i = A_i^T e_i`` (through the pool's adjoint) at its output and
       back-propagates it inside itself: the exact gradient of its own local loss, in closed form.
    4. The head learns from the global loss (``e = dL/da_L``), as in BP.

    The classifiers are fixed random buffers by default (the paper; the ASAP thesis's Table 5.3
    baseline [51]: "random fixed weights to make local outputs"); with ``learn_classifier=True``
    they are Parameters trained on their ``L_i`` (the block still gets ``A_i^T e_i`` from the
    classifier as it was before the step). Inference (``rule.model``) never uses them.

    Args:
        pool: average-pool ``k x k`` (stride k) before the classifier, for conv blocks; 1 (default):
            the flattened block output, as Mostafa et al.; 2: the thesis's ASFP local classifier.
        learn_classifier: train the classifiers (Parameters) instead of keeping them fixed.
        local_loss: loss of the classifiers (``"cross-entropy"`` or ``"mse"`` on one-hot targets).

    Differences from the paper: classifier weights are uniform in ``±1/sqrt(n_i)`` (PyTorch's
    Linear init range), no bias; losses are means over the batch. The thesis's ASFP+LC, whose
    classifier error reaches its block through a fixed random ``B`` (FA), is the ``asfp-lc`` rule
    (rules/activation_sharing.py), built on this one.

    References: Mostafa, Ramesh & Cauwenberghs 2018, "Deep supervised learning using local
    errors", Front. Neurosci. 12; Woo 2023 (ASAP thesis), Table 5.3 and Sec. 5.2.4.
    """

    top_blocks = 1  # the head alone learns from the global error
    per_block_modules = ("classifiers",)
    hidden_waits_for_error = False  # A_i^T e_i needs only h_i and y*
    needs_target = True

    def __init__(self, model: nn.Module, num_classes: int, loss: str = "cross-entropy", input_shape=None,
                 pool: int = 1, learn_classifier: bool = False, local_loss: str = "cross-entropy", blocks=None):
        super().__init__(model, num_classes, loss, input_shape, blocks)
        self.require_flat_output()  # a classifier per block: one class per sample
        self.local_error = get_loss(local_loss)
        self.learn_classifier = learn_classifier
        self.classifiers = nn.ModuleList(
            LinearLocal(shape, num_classes, pool if len(shape) == 3 else 1) for shape in self.hidden_output_shapes()
        ).to(**placement(model))
        if not learn_classifier:
            for module in self.classifiers:
                freeze(module)

    def signals(self, e: Tensor, target: Tensor, outputs: list[Tensor], blocks: range) -> list[Tensor]:
        # dL_i/dh_i in closed form: the classifier is linear in h_i (no autograd call).
        return [A.feedback(self.local_error.error(A(h.detach()), target)[1])
                for A, h in zip(self.classifiers[blocks.start:blocks.stop], outputs)]

    def local_loss(self, outputs: list[Tensor], logits: Tensor | None, target: Tensor, blocks: range) -> Tensor | None:
        if not (self.learn_classifier and outputs):
            return None
        return sum(self.local_error.value(A(h.detach()), target)
                   for A, h in zip(self.classifiers[blocks.start:blocks.stop], outputs))
