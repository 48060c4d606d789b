"""CPU against CUDA, generated from the registry (runs only where CUDA is present; issue 21).

Every rule's step on the same float64 weights and batch gives the same gradients on both devices
(TF32 off), and the CUDA step makes no host synchronisation (``set_sync_debug_mode("error")``
raises on one: an ``.item()``, a ``nonzero``, a pageable copy hidden in the hot path).
"""


import pytest
import torch

import creditflow as cf
from tests.reference import batch, rule_and_copy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.sh runs it)")
RULES = cf.rules.available()


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", RULES)
def test_a_step_on_cuda_equals_the_cpu_step_without_a_host_sync(name, kind):
    cpu, gpu = rule_and_copy(name, kind)
    gpu.to("cuda")
    x, y = batch(cpu.model.input_shape, n=16)
    torch.manual_seed(0)
    cpu.step(x, y)
    xg, yg = x.cuda(), y.cuda()
    torch.cuda.manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.step(xg, yg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (n, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if name == "dtp" and n.startswith("inverse"):
            continue  # its reconstruction noise comes from each device's own generator: other draws
        if p.grad is not None:
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-9, atol=1e-10, msg=n)
