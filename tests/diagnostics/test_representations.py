import itertools
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

import creditflow as cf
from creditflow.diagnostics import representations as reps
from creditflow.diagnostics.representations import (
    balanced_subset,
    class_distances,
    class_statistics,
    collect_representations,
    mean_pairwise_distance,
)
from tests.reference import batch, tiny_cnn, tiny_mlp


def test_inter_intra_ratio_on_hand_made_points():
    # Class 0: a 3-4-5 right triangle; its pairwise distances 3, 4, 5 average 4; centroid (1, 4/3).
    # Class 1: two points 2 apart, centroid (10, 1). Intra = mean over classes = (4 + 2) / 2 = 3.
    # Inter = |(1, 4/3) - (10, 1)| = sqrt(81 + 1/9) = sqrt(730) / 3.
    z = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [10.0, 0.0], [10.0, 2.0]])
    y = torch.tensor([0, 0, 0, 1, 1])
    d = class_distances(z, y)
    assert d.intra_per_class == pytest.approx({0: 4.0, 1: 2.0})
    assert d.intra == pytest.approx(3.0)
    assert d.inter == pytest.approx(math.sqrt(730) / 3)
    assert d.ratio == pytest.approx(math.sqrt(730) / 9)
    assert d.counts == {0: 3, 1: 2}
    # The order of the points does not matter, and the ratio does not change with the scale.
    perm = torch.tensor([4, 1, 3, 0, 2])
    assert class_distances(z[perm], y[perm]).ratio == pytest.approx(d.ratio)
    assert class_distances(7.5 * z, y).ratio == pytest.approx(d.ratio)


def test_inter_averages_every_pair_of_centroids_and_single_points_have_no_intra():
    z = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # three classes of one point each
    d = class_distances(z, torch.tensor([0, 1, 2]))
    assert d.inter == pytest.approx((3 + 4 + 5) / 3)
    assert math.isnan(d.intra) and math.isnan(d.ratio)
    one_class = class_distances(z, torch.zeros(3, dtype=torch.long))
    assert math.isnan(one_class.inter) and one_class.intra == pytest.approx(4.0)


def test_chunked_pairwise_mean_equals_the_plain_double_loop(monkeypatch):
    z = torch.randn(13, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = sum((z[i] - z[j]).norm().item() for i, j in itertools.permutations(range(13), 2)) / (13 * 12)
    assert mean_pairwise_distance(z) == pytest.approx(plain, rel=1e-9)
    monkeypatch.setattr(reps, "_CHUNK_ENTRIES", 20)  # one row of 13 per chunk
    assert mean_pairwise_distance(z) == pytest.approx(plain, rel=1e-9)
    assert math.isnan(mean_pairwise_distance(z[:1]))


@pytest.mark.parametrize("rule_name", ["bp", "dfa", "fa"])
def test_default_representations_are_each_blocks_output(rule_name):
    model = tiny_mlp(dims=(6, 5, 4, 3), unused_parameter=False)
    rule = cf.rules.build(rule_name, model, num_classes=3)
    x, _ = batch((6,))
    out = rule.representations(x)
    assert list(out) == ["block0", "block1", "head"]
    assert [tuple(h.shape) for h in out.values()] == [(7, 5), (7, 4), (7, 3)]
    assert torch.allclose(out["head"], model(x)) and not out["head"].requires_grad
    assert torch.allclose(out["block1"], model[1](model[0](x)))


def test_representations_run_in_eval_mode_and_restore_every_modules_mode():
    model = tiny_cnn(batch_norm=True)
    rule = cf.rules.build("bp", model, num_classes=3)
    model[1][0].eval()  # a module left in eval on purpose stays so
    x, _ = batch((2, 8, 8))
    before = model[0][1].running_mean.clone()
    out = rule.representations(x)
    assert [tuple(h.shape) for h in out.values()] == [(7, 3, 4, 4), (7, 4, 2, 2), (7, 5), (7, 3)]
    assert torch.equal(model[0][1].running_mean, before)  # eval: BatchNorm statistics untouched
    assert rule.training and model[0].training and not model[1][0].training


def test_named_children_keep_their_names():
    model = nn.Sequential(OrderedDict(encoder=nn.Sequential(nn.Linear(4, 3), nn.ReLU()), classifier=nn.Linear(3, 2)))
    rule = cf.rules.build("bp", model, num_classes=2)
    assert list(rule.representations(torch.randn(5, 4))) == ["encoder", "classifier"]


def test_a_model_may_name_its_own_layers_and_other_modules_give_their_output():
    class Folded(nn.Module):  # children not in forward order: only the model knows its layers
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(3, 2), nn.Linear(4, 3)

        def forward(self, x):
            return self.up(self.down(x))

    rule = cf.rules.build("bp", Folded(), num_classes=2)
    x = torch.randn(5, 4)
    assert list(rule.representations(x)) == ["output"]
    rule.model.representations = lambda x: {"mid": rule.model.down(x), "out": rule.model(x)}
    assert [tuple(h.shape) for h in rule.representations(x).values()] == [(5, 3), (5, 2)]


def test_balanced_subset_takes_the_same_number_of_each_class():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 7)
    idx = balanced_subset(labels, 12, seed=3)
    assert torch.bincount(labels[idx]).tolist() == [4, 4, 4]
    assert len(set(idx.tolist())) == 12 and torch.equal(idx, balanced_subset(labels, 12, seed=3))
    assert torch.bincount(labels[balanced_subset(labels, 18)]).tolist() == [6, 4, 6]  # class 1 gives all it has
    with pytest.raises(ValueError, match="at least the number of classes"):
        balanced_subset(labels, 2)


def test_class_statistics_one_class_at_a_time_equals_all_points_at_once():
    model = tiny_mlp(dims=(6, 5, 4, 3), unused_parameter=False)
    rule = cf.rules.build("bp", model, num_classes=3)
    x, y = batch((6,), n=30)
    stats = class_statistics(rule, x, y, keep_per_class=2, batch_size=4)
    feats = collect_representations(rule, x, batch_size=8)
    assert list(stats.distances) == ["input", "block0", "block1", "head"] == list(feats)
    assert stats.dims == {"input": 6, "block0": 5, "block1": 4, "head": 3}
    for name, z in feats.items():
        assert stats.distances[name].ratio == pytest.approx(class_distances(z, y).ratio, rel=1e-9)
    assert stats.kept["head"].shape == (6, 3) and stats.kept_labels.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="unknown layer.*available: input, block0, block1, head"):
        collect_representations(rule, x, layers=["block9"])


def test_tsne_gives_two_coordinates_per_point():
    pytest.importorskip("sklearn")  # the `analysis` extra
    z = torch.randn(12, 60, generator=torch.Generator().manual_seed(0))
    points, perplexity = reps.tsne_embedding(z, perplexity=30, seed=0)
    assert points.shape == (12, 2) and perplexity == pytest.approx(11 / 3)
