"""The three shared mechanisms every rule is built from (see docs/design.md)."""

from .feedback import FeedbackConv2d, FeedbackLinear, attach_feedback, random_like_init
from .losses import LOSSES, get_loss
from .injection import DirectFeedback, block_output_shapes, inject, output_error, run_cut

__all__ = [
    "FeedbackConv2d", "FeedbackLinear", "attach_feedback", "random_like_init",
    "LOSSES", "get_loss", "DirectFeedback", "block_output_shapes", "inject", "output_error", "run_cut",
]
