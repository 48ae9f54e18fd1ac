import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from probing.probe import train_probe
from probing.tables import accuracy_table, formatted
from sdattn.tables import write_table

from .conftest import ROOT


def _trainer():
    cfg = OmegaConf.load(ROOT / "configs" / "trainer" / "probe.yaml")
    cfg.max_epochs = 30
    return instantiate(cfg)


def test_probe_learns_separable_classes_and_shuffled_control_does_not():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 20, generator=g) * 3
    y = torch.arange(4).repeat_interleave(30)
    x = centers[y] + torch.randn(120, 20, generator=g)
    train = torch.arange(120) % 5 != 0
    r = train_probe(x[train], y[train], x[~train], y[~train], 4, _trainer(), seed=0)
    assert r.overall > 0.9 and r.per_class.shape == (4,) and float(r.per_class.min()) > 0.6
    c = train_probe(x[train], y[train], x[~train], y[~train], 4, _trainer(), seed=0, shuffle_labels=True)
    assert c.overall < 0.6


def test_table_layout_and_files(tmp_path):
    per_class = {"L3": [np.array([1.0, 0.5]), np.array([0.5, 0.5])], "L6": [np.array([0.0, 1.0])] * 2}
    overall = {"L3": [0.75, 0.5], "L6": [0.5, 0.5]}
    mean, std = accuracy_table(per_class, ["red", "green"], overall, {"L3": [0.5, 0.5], "L6": [0.4, 0.6]}, 0.5)
    assert list(mean.columns) == ["L3", "L6", "Avg"]
    assert list(mean.index) == ["red", "green", "overall", "shuffled-label control", "chance"]
    assert mean.loc["red", "L3"] == 75 and mean.loc["red", "Avg"] == 37.5 and std.loc["red", "L3"] == 25
    table = formatted(mean, std, with_std=True)
    assert table.loc["red", "L3"] == "75.0 ± 25.0"
    paths = write_table(table, tmp_path, "t1", "caption")
    back = pd.read_csv(paths["csv"], index_col=0)
    assert back.loc["green", "L6"] == "100.0 ± 0.0"
    assert "\\begin{table}" in paths["tex"].read_text() and "| red" in paths["md"].read_text()


def test_capture_workers_give_the_features_of_one_worker(tiny_pipe):
    """probe.workers: batches captured side by side (own UNet modules, one torch thread each) equal the
    batches captured one after another, in order; the torch thread count is restored."""
    import pytest

    from probing.capture import CaptureSpec, capture_features
    from probing.features import in_workers
    from sdattn.errors import UserError
    from sdattn.layers import enumerate_layers
    from sdattn.sampling import latent_size

    layers = [x for x in enumerate_layers(tiny_pipe.unet, latent_size(tiny_pipe)) if x.kind == "cross"][:2]
    spec = CaptureSpec(kind="cross", tokens=["{cls}"])
    batches = [[("a red car", 0), ("a blue car", 1)], [("a red car", 2)], [("a blue car", 3), ("a red car", 4)]]

    def work(pipe, batch):
        return capture_features(pipe, layers, spec, [p for p, _ in batch], [s for _, s in batch],
                                [[p.split()[1]] for p, _ in batch], 2, 7.5)

    threads = torch.get_num_threads()
    one = list(in_workers(tiny_pipe, batches, work, 1))
    two = list(in_workers(tiny_pipe, batches, work, 2))
    assert torch.get_num_threads() == threads
    assert [b for b, _ in two] == batches
    for (_, a), (_, b) in zip(one, two):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="probe.workers 0"):
        list(in_workers(tiny_pipe, batches, work, 0))
