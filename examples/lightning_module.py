"""A rule inside PyTorch Lightning (manual optimization): ``python examples/lightning_module.py --rule dfa``.

Lightning's automatic optimization calls ``loss.backward()`` itself, which is the rule's path
too; manual optimization is shown because it is where the rule's ``backward`` (with its loss
``scale`` under a GradScaler or accumulation) goes, as ``manual_backward`` would for autograd.
Needs ``pip install lightning``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import creditflow as cf


class RuleModule(L.LightningModule):
    """Any creditflow rule as a LightningModule."""

    def __init__(self, rule_name: str = "dfa", spec: str = "mlp:784-256-256-10", num_classes: int = 10,
                 lr: float = 1e-3):
        super().__init__()
        self.automatic_optimization = False
        self.rule = cf.rules.build(rule_name, cf.models.build(spec), num_classes=num_classes)
        self.lr = lr

    def forward(self, x):
        return self.rule(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        out = self.rule(x, y if self.rule.needs_target else None)
        loss = F.cross_entropy(out, y)
        self.rule.backward(loss)  # fills .grad as the rule prescribes
        opt.step()
        opt.zero_grad()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.rule(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.rule.param_groups(), lr=self.lr)


def loaders(batch_size: int = 32):
    splits = cf.data.load("fashion-mnist-mini")
    train = TensorDataset(splits.normalize(splits.train.images), splits.train.labels)
    test = TensorDataset(splits.normalize(splits.test.images), splits.test.labels)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(test, batch_size=256))


def train(rule_name: str = "dfa", epochs: int = 2, accelerator: str = "cpu") -> float:
    """Fit with a Lightning Trainer on the embedded data; return the test accuracy."""
    L.seed_everything(0, verbose=False)
    module = RuleModule(rule_name)
    train_loader, test_loader = loaders()
    trainer = L.Trainer(max_epochs=epochs, accelerator=accelerator, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_loader)
    return trainer.validate(module, test_loader, verbose=False)[0]["val_acc"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rule", default="dfa", choices=cf.rules.available())
    parser.add_argument("--accelerator", default="cpu", help="a Lightning accelerator: cpu, gpu, auto")
    parser.add_argument("--max-epochs", type=int, default=2)
    args = parser.parse_args()
    accuracy = train(args.rule, args.max_epochs, args.accelerator)
    print(f"{args.rule} in Lightning ({args.accelerator}): test accuracy {accuracy:.4f}")
