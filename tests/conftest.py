"""Unit tests use tiny tensors: one thread avoids thread start-up and contention costs."""

import torch

torch.set_num_threads(1)
