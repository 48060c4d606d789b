"""What the layers of a trained rule represent: class distances of their features, and t-SNE.

Associated Learning's section 5.4 (Kao & Chen 2021) asks whether hidden layers learn useful
*metafeatures* (the hidden representations). It measures them in two ways, which apply to any
rule's layers:

* **class distances** (their Table 7). For class k with points ``z_1 .. z_{n_k}`` (features of one
  layer, flattened), the intra-class distance is the average Euclidean distance between any two of
  its points, ``d_k^intra = 2 / (n_k (n_k - 1)) sum_{i<j} ||z_i - z_j||``; the layer's intra-class
  distance is the mean of ``d_k^intra`` over the classes. The inter-class distance is the average
  distance between class centroids ``c_k = mean_i z_i``: ``2 / (K (K - 1)) sum_{k<l} ||c_k - c_l||``.
  The ratio inter / intra (larger: classes farther apart than they are wide) does not change when
  the features are scaled, so layers of different sizes and rules of different scales compare.
* **t-SNE** of each layer's features, one colour per class (their Figures 5 and 6).

The paper does not say whether the overall intra-class distance weights classes by size; with a
class-balanced sample (what :func:`balanced_subset` gives) both readings agree.

Everything here is a pure function of tensors, except :func:`class_statistics`, which runs a rule's
``representations`` over a sample one class at a time (so only one class's features are held at
once, whatever the model), and the t-SNE and plotting helpers, which need the optional extras
``analysis`` (scikit-learn) and ``plot`` (matplotlib).

References: Kao & Chen 2021 (Associated Learning, Neural Computation), Sec. 5.4, Table 7,
Figs. 5-6; van der Maaten & Hinton 2008 (t-SNE); Michael & Lin 1973 (inter/intra distance ratios).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..report import figure_class

__all__ = ["ClassDistances", "ClassStatistics", "DistanceAccumulator", "balanced_subset", "class_distances", "class_statistics",
           "collect_representations", "mean_pairwise_distance", "plot_tsne", "require_sklearn", "tsne_embedding"]

_CHUNK_ENTRIES = 1 << 22  # distances held at once by mean_pairwise_distance: 32 MB in float64


@dataclass(frozen=True)
class ClassDistances:
    """Class distances of one layer's features (NaN where undefined).

    Attributes:
        inter: mean distance between the centroids of every pair of classes (NaN: under 2 classes).
        intra: mean over classes of ``d_k^intra`` (classes with at least 2 points).
        ratio: ``inter / intra`` (NaN when either is NaN or intra is 0).
        intra_per_class: ``{class: d_k^intra}``, NaN for a class with one point.
        counts: ``{class: n_k}``.
    """

    inter: float
    intra: float
    ratio: float
    intra_per_class: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)


def mean_pairwise_distance(z: Tensor) -> float:
    """Average Euclidean distance over all pairs ``i != j`` of the rows of ``z`` (n, D); NaN if n < 2.

    Computed in float64 in row chunks, so memory stays bounded for any n.
    """
    n = len(z)
    if n < 2:
        return math.nan
    z = z.reshape(n, -1).double()
    rows = max(1, _CHUNK_ENTRIES // n)
    total = torch.zeros((), dtype=torch.float64, device=z.device)
    for start in range(0, n, rows):
        d = torch.cdist(z[start:start + rows], z)  # (rows, n)
        # The matmul path of cdist leaves tiny non-zeros on the diagonal; a point is 0 from itself.
        idx = torch.arange(len(d), device=z.device)
        d[idx, idx + start] = 0.0
        total += d.sum()
    return (total / (n * (n - 1))).item()


class DistanceAccumulator:
    """Class distances of one layer, fed one class at a time: ``add(k, z_k)`` then ``result()``.

    Keeps only each class's centroid and ``d_k^intra``, so features of all classes never need to be
    in memory together.
    """

    def __init__(self):
        self.centroids: dict[int, Tensor] = {}  # (D,) float64
        self.intra: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def add(self, k: int, z: Tensor) -> None:
        """Every point of class ``k`` at once: ``z`` (n_k, ...)."""
        k = int(k)
        if k in self.counts:
            raise ValueError(f"class {k} was already added; pass all of its points in one call")
        if len(z) == 0:
            return
        z = z.reshape(len(z), -1)
        self.centroids[k] = z.double().mean(0)
        self.intra[k] = mean_pairwise_distance(z)
        self.counts[k] = len(z)

    def result(self) -> ClassDistances:
        classes = sorted(self.counts)
        intra_values = [self.intra[k] for k in classes if not math.isnan(self.intra[k])]
        intra = sum(intra_values) / len(intra_values) if intra_values else math.nan
        if len(classes) >= 2:
            c = torch.stack([self.centroids[k] for k in classes])  # (K, D)
            inter = mean_pairwise_distance(c)
        else:
            inter = math.nan
        ratio = inter / intra if intra > 0 else math.nan  # NaN intra: comparison is False
        return ClassDistances(inter, intra, ratio, {k: self.intra[k] for k in classes},
                              {k: self.counts[k] for k in classes})


def class_distances(z: Tensor, labels: Tensor) -> ClassDistances:
    """Intra- and inter-class distances of points ``z`` (N, ...) with class ``labels`` (N,)."""
    if len(z) != len(labels):
        raise ValueError(f"{len(z)} points but {len(labels)} labels")
    acc = DistanceAccumulator()
    for k in torch.unique(labels).tolist():
        acc.add(k, z[labels == k])
    return acc.result()


def balanced_subset(labels: Tensor, samples: int, seed: int = 0) -> Tensor:
    """Indices of up to ``samples // K`` random samples of each of the K classes present, class by class.

    A class with fewer samples gives all it has. Seeded (CPU ``randperm``): the same everywhere.
    """
    labels = labels.cpu()
    classes = torch.unique(labels)
    per_class = samples // len(classes) if len(classes) else 0
    if per_class < 1:
        raise ValueError(f"samples must be at least the number of classes ({len(classes)}), got {samples}")
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for k in classes.tolist():
        members = torch.nonzero(labels == k).flatten()
        picks.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picks)


def collect_representations(rule: nn.Module, images: Tensor, *, transform: Callable[[Tensor], Tensor] | None = None,
                            batch_size: int = 500, device: torch.device | str = "cpu",
                            layers: Sequence[str] | None = None, include_input: bool = True) -> dict[str, Tensor]:
    """Run ``rule.representations`` over ``images`` in batches; ``{layer: (N, D) float32 on CPU}``.

    Args:
        rule: a ``Rule`` (anything with ``representations(x) -> {name: (N, ...)}``).
        images: (N, ...) raw inputs; each batch is moved to ``device`` and passed through ``transform``
            (e.g. ``splits.normalize``).
        layers: keep only these layers (unknown names are an error that lists the layers).
        include_input: add ``"input"``, the transformed input itself (the paper's "raw data"), first.
    """
    chunks: dict[str, list[Tensor]] = {}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = transform(x) if transform is not None else x
        reps = rule.representations(x)
        if include_input:
            reps = {"input": x, **reps}
        if layers is not None:
            unknown = [name for name in layers if name not in reps]
            if unknown:
                raise ValueError(f"unknown layer(s) {', '.join(unknown)}; available: {', '.join(reps)}")
            reps = {name: reps[name] for name in reps if name in layers}  # forward order
        for name, h in reps.items():
            chunks.setdefault(name, []).append(h.detach().reshape(len(h), -1).float().cpu())  # (n, D)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


@dataclass
class ClassStatistics:
    """What :func:`class_statistics` returns.

    Attributes:
        distances: ``{layer: ClassDistances}`` in forward order.
        dims: ``{layer: D}``, the flattened feature size.
        kept: ``{layer: (M, D)}`` the first ``keep_per_class`` points of every class (for t-SNE).
        kept_labels: (M,) their classes.
    """

    distances: dict[str, ClassDistances]
    dims: dict[str, int]
    kept: dict[str, Tensor]
    kept_labels: Tensor


def class_statistics(rule: nn.Module, images: Tensor, labels: Tensor, *, keep_per_class: int = 0,
                     progress: Callable | None = None, **collect) -> ClassStatistics:
    """Class distances of every layer of ``rule`` on ``images``, one class at a time.

    Only one class's features (all layers) are in memory at once, plus the ``keep_per_class``
    points of each class kept for t-SNE. ``collect`` goes to :func:`collect_representations`
    (``transform``, ``batch_size``, ``device``, ``layers``, ``include_input``). ``progress`` wraps
    the list of classes (e.g. ``tqdm``).
    """
    labels = labels.cpu()
    classes = torch.unique(labels).tolist()
    accs: dict[str, DistanceAccumulator] = {}
    dims: dict[str, int] = {}
    kept: dict[str, list[Tensor]] = {}
    kept_labels = []
    for k in (progress(classes) if progress else classes):
        feats = collect_representations(rule, images[labels == k], **collect)
        for name, z in feats.items():
            accs.setdefault(name, DistanceAccumulator()).add(k, z)
            dims[name] = z.shape[1]
            if keep_per_class:
                kept.setdefault(name, []).append(z[:keep_per_class].clone())
        kept_labels.append(torch.full((min(keep_per_class, int((labels == k).sum())),), k, dtype=torch.long))
    return ClassStatistics({name: acc.result() for name, acc in accs.items()}, dims,
                           {name: torch.cat(parts) for name, parts in kept.items()},
                           torch.cat(kept_labels) if kept_labels else torch.zeros(0, dtype=torch.long))


def require_sklearn():
    """scikit-learn's ``(TSNE, PCA)``, or an ImportError naming the extra that provides them."""
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("t-SNE needs scikit-learn: pip install 'creditflow[analysis]' "
                          "(or pass --no-tsne to skip it)") from None
    return TSNE, PCA


def tsne_embedding(z: Tensor, *, perplexity: float = 30.0, seed: int = 0, pca_dims: int = 50):
    """2-D t-SNE of the rows of ``z`` (n, D): ``(points (n, 2) numpy, perplexity used)``.

    As scikit-learn advises, features wider than ``pca_dims`` are first reduced to ``pca_dims``
    principal components (faster, and less noise). The perplexity is capped at ``(n - 1) / 3`` so
    small samples work; the one used is returned. Seeded: the same input gives the same picture.
    """
    TSNE, PCA = require_sklearn()
    n = len(z)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    x = z.reshape(n, -1).double().numpy()
    if x.shape[1] > pca_dims:
        x = PCA(n_components=min(pca_dims, n), random_state=seed).fit_transform(x)
    used = min(float(perplexity), (n - 1) / 3)
    points = TSNE(n_components=2, perplexity=used, init="pca", learning_rate="auto",
                  random_state=seed).fit_transform(x)
    return points, used


def class_colors(num_classes: int) -> list:
    """One colour per class: tab10 / tab20 while they last, then evenly spaced hues."""
    from matplotlib import colormaps

    if num_classes <= 10:
        return [colormaps["tab10"](k) for k in range(num_classes)]
    if num_classes <= 20:
        return [colormaps["tab20"](k) for k in range(num_classes)]
    return [colormaps["hsv"](k / num_classes) for k in range(num_classes)]


def plot_tsne(panels: Sequence[tuple[str, object]], labels, *, class_names: Sequence[str] = (),
              num_classes: int | None = None):
    """One figure of t-SNE panels, up to 5 a row, one colour per class (the paper's Figs. 5-6 rows).

    Args:
        panels: ``(title, points (n, 2))`` per panel; every panel shows the same samples.
        labels: (n,) class of each point.
        class_names: names in label order, for the legend (shown for up to 20 classes).
    """

    Figure = figure_class()
    labels = torch.as_tensor(labels).cpu()
    num_classes = num_classes or (int(labels.max()) + 1 if len(labels) else 1)
    colors = class_colors(num_classes)
    ncols = min(len(panels), 5)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.4 * ncols + (1.6 if num_classes <= 20 else 0), 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (title, points) in zip(axes, panels):
        for k in range(num_classes):
            mask = (labels == k).numpy()
            if mask.any():
                name = class_names[k] if k < len(class_names) else str(k)
                ax.scatter(points[mask, 0], points[mask, 1], s=6, color=colors[k], label=name, linewidths=0)
        ax.set_title(title, fontsize="medium")
        ax.set_xticks([])
        ax.set_yticks([])
    if num_classes <= 20:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right upper", fontsize="small", markerscale=2.5)
    return fig
