"""Two-layer MLP probes trained with Lightning; per-class test accuracy via torchmetrics."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
# lightning 2.6 building a LeafSpec under torch >= 2.10 warns on every fit (lightning/pytorch/utilities/_pytree.py)
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


class MLPProbe(pl.LightningModule):
    """Linear → ReLU → Dropout → Linear, cross-entropy, AdamW."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.2, lr: float = 1e-3,
                 weight_decay: float = 1e-4):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) → (B, n_classes)
        return self.net(x)

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


@dataclass
class ProbeResult:
    per_class: torch.Tensor  # (C,) test accuracy of each class
    overall: float  # test accuracy over all test samples


def standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z-score both with the training split's statistics."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def train_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    n_classes: int,
    make_trainer: Callable[[], pl.Trainer],
    seed: int = 0,
    hidden: int = 256,
    dropout: float = 0.2,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    shuffle_labels: bool = False,
) -> ProbeResult:
    """Fit one probe on (N, F) features; ``shuffle_labels`` gives the permuted-label control."""
    pl.seed_everything(seed, verbose=False)
    x_train, x_test = standardize(x_train.float(), x_test.float())
    if shuffle_labels:
        y_train = y_train[torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))]
    model = MLPProbe(x_train.shape[1], n_classes, hidden, dropout, lr, weight_decay)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    make_trainer().fit(model, loader)
    model.eval()
    with torch.no_grad():
        pred = model(x_test).argmax(-1)
    per_class = MulticlassAccuracy(num_classes=n_classes, average=None)(pred, y_test)
    overall = (pred == y_test).float().mean().item()
    return ProbeResult(per_class, overall)


def layer_probes(features: dict[str, torch.Tensor], y: torch.Tensor, train: torch.Tensor, n_classes: int,
                 seeds: list[int], make_trainer: Callable[[], pl.Trainer], mlp: dict, control: bool = False,
                 progress: bool = False, desc: str = "probes") -> tuple[dict, dict, dict]:
    """One probe per column and seed: ``features[column]`` (N, F) features, ``y`` (N,) labels, ``train`` (N,) bool
    split, ``mlp`` the probe's settings (:func:`train_probe`); ``control``: also the shuffled-label probe.
    → ({column: [per-class accuracy (C,) per seed]}, {column: [overall per seed]}, {column: [control per seed]}),
    what :func:`probing.tables.accuracy_table` reads."""
    per_class: dict[str, list] = {}
    overall: dict[str, list] = {}
    shuffled: dict[str, list] = {}
    for col, x in tqdm(features.items(), desc=desc, disable=not progress):
        for s in seeds:
            kw = dict(n_classes=n_classes, make_trainer=make_trainer, seed=int(s), **mlp)
            r = train_probe(x[train], y[train], x[~train], y[~train], **kw)
            per_class.setdefault(col, []).append(r.per_class.numpy())
            overall.setdefault(col, []).append(r.overall)
            if control:
                shuffled.setdefault(col, []).append(
                    train_probe(x[train], y[train], x[~train], y[~train], shuffle_labels=True, **kw).overall)
    return per_class, overall, shuffled
