"""The three shared mechanisms every rule is built from (see docs/design.md)."""

from .feedback import FeedbackConv2d, FeedbackLinear, attach_feedback, random_like_init
from .injection import (
                        FEEDBACK_INITS,
                        BoundaryCut,
                        DirectFeedback,
                        Segment,
                        check_feedback_init,
                        downstream_product,
                        inject,
                        run_cut,
)
from .local import ConvLocal, LinearLocal, local_module
from .losses import LOSSES, get_loss
from .modes import block_output_shapes, eval_mode, probe_batch
from .tap import after_backward, tap

__all__ = [
    "FeedbackConv2d", "FeedbackLinear", "attach_feedback", "random_like_init",
    "ConvLocal", "LinearLocal", "local_module",
    "LOSSES", "get_loss", "FEEDBACK_INITS", "BoundaryCut", "DirectFeedback", "Segment", "check_feedback_init", "downstream_product", "inject", "run_cut",
    "block_output_shapes", "eval_mode", "probe_batch", "after_backward", "tap",
]
