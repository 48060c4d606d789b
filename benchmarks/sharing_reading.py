"""Weight-gradient cosine with BP at initialisation, per activation-sharing reading (docs/rules.md).

``as`` (B = W, so the errors are BP's) under the thesis's reading and under ``reading="group-input"``:
mean cosine over the trained layers, and how many layers get exactly BP's gradient.
Usage: ``python benchmarks/sharing_reading.py``.
"""
import copy

import torch
from torch.nn import functional as F

import creditflow as cf

torch.manual_seed(0)
splits = cf.data.load("fashion-mnist-mini")
x = splits.normalize(splits.train.images[:256]); y = splits.train.labels[:256]
for spec, model_spec in [("mlp", "mlp:784-256-256-256-256-10"), ("resnet18", "resnet18")]:
    torch.manual_seed(0)
    kw = dict(width=16, input_shape=(1, 28, 28)) if spec == "resnet18" else {}
    base = cf.models.build(model_spec, num_classes=10, **kw)
    bp = copy.deepcopy(base); F.cross_entropy(bp(x), y).backward()
    ref = {n: p.grad for n, p in bp.named_parameters() if p.dim() > 1}
    for k in (2, 4):
        row = []
        for reading in ("thesis", "group-input"):
            m = copy.deepcopy(base)
            r = cf.rules.build("as", m, 10, k=k, reading=reading)
            r.step(x, y)
            cos = [F.cosine_similarity(p.grad.flatten(), ref[n].flatten(), 0).item()
                   for n, p in m.named_parameters() if p.dim() > 1 and p.grad is not None and n in ref]
            row.append((reading, min(cos), sum(cos)/len(cos), sum(c > 0.999 for c in cos), len(cos)))
        print(spec, "k", k, row)
