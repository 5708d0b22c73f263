"""Charts for the console, drawn server-side by matplotlib as SVG (no JavaScript, works offline).

Figures are built with the object API (``matplotlib.figure.Figure``), never ``pyplot``, so no
global state is shared between requests.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure


def pca_2d(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first two principal coordinates of the rows of ``Z`` and the share of variance each explains.

    Centred SVD (exact, no sampling): for the few thousand records a console shows this is instant.
    With one record, or all z equal, the coordinates are zeros.
    """
    Z = np.asarray(Z, dtype=np.float64)
    if Z.shape[0] == 0:
        return np.zeros((0, 2)), np.zeros(2)
    X = Z - Z.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(X, full_matrices=False)
    coords = np.zeros((Z.shape[0], 2))
    k = min(2, s.shape[0])
    coords[:, :k] = u[:, :k] * s[:k]
    total = float(np.sum(s**2))
    explained = np.zeros(2)
    if total > 0:
        explained[:k] = s[:k] ** 2 / total
    return coords, explained


def literal(text: str) -> str:
    """``text`` as matplotlib must be given it to draw it literally: ``$`` escaped (else a name like
    ``$x^{$`` from a lying site is parsed as mathtext and the chart fails), and a leading ``_``
    guarded by a zero-width space (else the legend silently drops an entry named ``_x``)."""
    out = str(text).replace("$", r"\$")  # no unescaped $ left: never mathtext, and \$ is drawn as $
    return "\u200b" + out if out.startswith("_") else out


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    return buf.getvalue()


def pca_map_svg(
    coords: np.ndarray, labels: Sequence[str], explained: np.ndarray, colour_by: str, title: str | None = None
) -> str:
    """A scatter of the 2-D PCA map, one colour per label (site or task), with a legend; ``title``
    names the family (one map per family: their z live in different spaces)."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    groups = sorted(set(labels))
    cmap = colormaps["tab10"]
    for i, g in enumerate(groups):
        idx = [j for j, lab in enumerate(labels) if lab == g]
        ax.scatter(
            coords[idx, 0],
            coords[idx, 1],
            s=36,
            label=literal(g),
            color=cmap(i % 10),
            edgecolors="black",
            linewidths=0.4,
        )
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f} % of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f} % of variance)")
    ax.set_title(literal((f"{title}: " if title else "") + f"z of {len(labels)} record(s), coloured by {colour_by}"))
    if groups:
        ax.legend(fontsize=8, title=colour_by, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.grid(alpha=0.3)
    return _svg(fig)


def weights_svg(ids: Sequence[str], weights: Sequence[float], title: str) -> str:
    """A horizontal bar per retrieved adapter; negative weights (``lin``) drawn to the left, in another colour."""
    fig = Figure(figsize=(6.4, 0.5 + 0.45 * max(1, len(ids))))
    ax = fig.add_subplot()
    w = np.asarray(weights, dtype=np.float64)
    y = np.arange(len(ids))
    ax.barh(y, w, color=["#2b6cb0" if v >= 0 else "#c05621" for v in w])
    ax.set_yticks(y, labels=[literal(i) for i in ids], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("weight w_i")
    ax.set_title(literal(title), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)
