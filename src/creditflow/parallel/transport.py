"""The pipeline's point-to-point messages: one stage's links to its neighbours and to the last stage.

Channels (each on its own process group, so that every group carries one kind of message in one
direction between any two ranks):

- **headers**, stage s -> s+1, on a gloo group: ``[k, n, last]`` (int64, host memory). The receiver
  learns the micro-batch size ``n`` without reading a device tensor, so no step waits on the GPU for
  it; ``last`` 1 means the run stops after this micro-batch (a signal reached stage 0).
- **forward**, stage s -> s+1, on the run's backend (NCCL on CUDA): the labels ``y`` and the boundary
  tensors, each padded to the batch size ``B`` so that buffers can be posted before ``n`` is known.
- **errors**, last stage -> each stage that waits for the output error: ``[e | logits]`` (B, 2C).
- **decodes**, stage s+1 -> s (AL's prediction coming back down): the decoded estimate of ``t``.

Why one group per channel: NCCL ignores tags and matches point-to-point messages between two ranks
of a communicator in the order they were posted. Within one channel both sides post in step order
(the sender one message list per step, the receiver the same list per step), so the k-th receive
matches the k-th send; two channels on one group between the same pair (errors and decodes both go
from the last stage to the one below it) could interleave differently on the two sides. gloo honours
tags, and gets the same layout. Sends stay in flight up to a window (``SEND_WINDOW``), which bounds
how far a stage runs ahead of its neighbour.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .stages import Plan, Stage

FORWARD_TAG, ERROR_TAG, DECODE_TAG, HEADER_TAG = 0, 1, 2, 3
#: forward messages a stage may have in flight before it waits for the oldest (bounds run-ahead)
SEND_WINDOW = 4
#: the control group waits this long: stages wait there while rank 0 evaluates and writes the checkpoint.
#: A stage that dies is still seen at once (by the launcher), and the data channels keep the launch timeout.
CONTROL_TIMEOUT = datetime.timedelta(hours=2)


class Groups(NamedTuple):
    control: Any  # gloo: plain-data messages (plan, states, metrics, end of epoch; parallel/messages.py)
    headers: Any  # gloo: [k, n] of each forward message, in host memory
    forward: Any  # the run's backend: labels and boundary tensors
    errors: Any  # the run's backend: the output error to the stages that wait for it
    decodes: Any  # the run's backend: AL's predictions coming back down


def make_groups() -> Groups:
    """Every rank calls this once, in the same order (``new_group`` is collective)."""
    world = list(range(dist.get_world_size()))
    control = dist.new_group(world, backend="gloo", timeout=CONTROL_TIMEOUT)
    headers = dist.new_group(world, backend="gloo")
    return Groups(control, headers, dist.new_group(world), dist.new_group(world), dist.new_group(world))


class Links:
    """Point-to-point messages of one stage: forward to its neighbours, errors from the last stage."""

    def __init__(self, stage: Stage, plan: Plan, batch_size: int, num_classes: int, dtype: torch.dtype,
                 device: torch.device, groups: Groups, receivers: Sequence[int]):
        self.stage, self.B, self.C, self.dtype, self.device = stage, batch_size, num_classes, dtype, device
        self.index, self.S = stage.index, stage.num_stages
        self.groups, self.receivers = groups, list(receivers)
        # gloo moves CPU tensors only: stage CUDA tensors through host memory (one GPU, several stages)
        self.wire = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.in_shapes = plan.inputs[self.index] if self.index > 0 else []
        # AL: the decoded estimate of t coming back down has the shape of the t this stage sends up
        self.decode_shape = plan.inputs[self.index + 1][-1] if self.index + 1 < self.S else None
        self._decodes: deque = deque()
        self._pending: deque = deque()  # (works, tensors) of our isends
        self._posted = None  # the next forward message, already posted
        self._errors: deque = deque()  # posted error receives, oldest first

    # forward channel
    def send_forward(self, k: int, y: Tensor, tensors: Sequence[Tensor], last: bool = False) -> None:
        header = torch.tensor([k, len(y), int(last)], dtype=torch.long)  # host memory: len(y) is known here
        payload = [self._pad(y), *(self._pad(t) for t in tensors)]
        works = [dist.isend(header, self.index + 1, group=self.groups.headers, tag=HEADER_TAG)]
        works += [dist.isend(t, self.index + 1, group=self.groups.forward, tag=FORWARD_TAG) for t in payload]
        self._pending.append((works, (header, *payload)))
        while len(self._pending) > SEND_WINDOW:
            self._wait_oldest()

    def recv_forward(self, prefetch: bool) -> tuple[list[Tensor], Tensor, bool]:
        """``(boundary tensors, labels, last)``: ``last``, the run stops after this micro-batch."""
        if self._posted is None:
            self._posted = self._post_forward()
        works, (header, y, *bufs) = self._posted
        for w in works:
            w.wait()
        last = bool(header[2])
        self._posted = self._post_forward() if prefetch and not last else None
        n = int(header[1])  # a host tensor: no device sync
        return [b[:n].to(self.device) for b in bufs], y[:n].to(self.device), last

    def _post_forward(self):
        header = torch.empty(3, dtype=torch.long)
        bufs = [torch.empty(self.B, dtype=torch.long, device=self.wire)]
        bufs += [torch.empty(self.B, *shape, dtype=self.dtype, device=self.wire) for shape in self.in_shapes]
        works = [dist.irecv(header, self.index - 1, group=self.groups.headers, tag=HEADER_TAG)]
        works += [dist.irecv(b, self.index - 1, group=self.groups.forward, tag=FORWARD_TAG) for b in bufs]
        return works, (header, *bufs)

    def _pad(self, t: Tensor) -> Tensor:
        t = t.to(self.wire)
        if len(t) == self.B:
            return t.contiguous()
        out = t.new_zeros(self.B, *t.shape[1:])
        out[:len(t)] = t
        return out

    # error channel
    def send_errors(self, e: Tensor, logits: Tensor) -> None:
        msg = self._pad(torch.cat([e, logits], 1).to(self.dtype))
        works = [dist.isend(msg, r, group=self.groups.errors, tag=ERROR_TAG) for r in self.receivers]
        self._pending.append((works, (msg,)))
        while len(self._pending) > SEND_WINDOW * max(1, self.S):
            self._wait_oldest()

    def post_error(self) -> None:
        buf = torch.empty(self.B, 2 * self.C, dtype=self.dtype, device=self.wire)
        self._errors.append((dist.irecv(buf, self.S - 1, group=self.groups.errors, tag=ERROR_TAG), buf))

    def take_error(self, n: int) -> tuple[Tensor, Tensor]:
        """``(e, logits)`` of the oldest posted error message, each (n, C)."""
        work, buf = self._errors.popleft()
        work.wait()
        buf = buf[:n].to(self.device)
        return buf[:, :self.C], buf[:, self.C:]

    # AL's decode channel (train accuracy): stage s+1 -> s
    def send_decode(self, t: Tensor) -> None:
        msg = self._pad(t)
        self._pending.append(([dist.isend(msg, self.index - 1, group=self.groups.decodes, tag=DECODE_TAG)], (msg,)))
        while len(self._pending) > SEND_WINDOW * max(1, self.S):
            self._wait_oldest()

    def post_decode(self) -> None:
        buf = torch.empty(self.B, *self.decode_shape, dtype=self.dtype, device=self.wire)
        self._decodes.append((dist.irecv(buf, self.index + 1, group=self.groups.decodes, tag=DECODE_TAG), buf))

    def take_decode(self, n: int) -> Tensor:
        work, buf = self._decodes.popleft()
        work.wait()
        return buf[:n].to(self.device)

    def flush(self) -> None:
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        works, _ = self._pending.popleft()
        for w in works:
            w.wait()


__all__ = ["CONTROL_TIMEOUT", "Groups", "Links", "SEND_WINDOW", "make_groups"]
