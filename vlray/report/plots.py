"""The report's figures: matplotlib on the Agg canvas (no pyplot state, no display, no network).

Each function draws one figure from plain numbers and writes it as a PNG to ``path``; what the
numbers mean is decided by the caller (vlray.report.sections).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

DPI = 110
FAMILY_COLOURS = {
    "image_appearance": "#9ecae1",
    "image_semantic": "#2171b5",
    "text_appearance": "#fdae6b",
    "text_semantic": "#d94801",
}
SIDE_COLOURS = {"both": "#6a3d9a", "image": "#2171b5", "text": "#d94801", "unspecified": "#444"}
SIDE_STYLES = {
    "both": ("o", "-"),
    "image": ("s", "--"),
    "text": ("^", "-."),
    "unspecified": ("D", "-"),
}
METHOD_COLOURS = {"nn": "#2171b5", "csls": "#d94801"}
OTHER = "#888888"


def _new(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path``."""
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def _wrap(title: str, width_in: float, fontsize: float = 9) -> str:
    """Wrap each line of a title to the figure's width (about 0.6 em per character)."""
    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(
        textwrap.fill(line, chars, break_on_hyphens=False) for line in title.split("\n")
    )


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _yerr(values, lows, highs) -> np.ndarray | None:
    """Asymmetric error bars from CI ends; a missing end draws no bar on that side."""
    v = np.array([_num(x) for x in values])
    lo = np.array([_num(x) for x in lows])
    hi = np.array([_num(x) for x in highs])
    if np.all(np.isnan(lo)) and np.all(np.isnan(hi)):
        return None
    return np.vstack(
        [np.nan_to_num(np.clip(v - lo, 0, None)), np.nan_to_num(np.clip(hi - v, 0, None))]
    )


def _ticks(labels: list[str], most: int = 13) -> tuple[list[int], list[str]]:
    """At most ``most`` evenly spread ticks, the first and last always among them."""
    pos = sorted({round(x) for x in np.linspace(0, len(labels) - 1, min(len(labels), most))})
    return pos, [labels[i] for i in pos]


def colour_scale(grids: Iterable[np.ndarray]) -> tuple[float, float]:
    """One (vmin, vmax) for every grid given (all the heatmaps of one metric), so that equal
    colours mean equal scores across model pairs: 0 to the largest finite score when none is
    negative, else symmetric about 0 (-m to m, m the largest magnitude); (0, 1) if none is
    finite."""
    finite = [g[np.isfinite(g)] for g in grids]
    values = np.concatenate(finite) if finite else np.array([])
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    if lo < 0:
        m = max(-lo, hi)
        return -m, m
    return 0.0, hi if hi > 0 else 1.0


def heatmap_figure(
    values: np.ndarray,
    vision_labels: list[str],
    language_labels: list[str],
    peak: tuple[int, int] | None,
    title: str,
    value_label: str,
    scale: tuple[float, float] | None = None,
) -> Figure:
    """A vision layer (y, deepest at the top) x language layer (x) grid with the peak boxed;
    one label per row and column (at most 13 shown per axis: every layer of a 12-block
    model). ``scale`` (vmin, vmax) fixes the colours (see colour_scale; default: this grid's
    own); a scale reaching below 0 is drawn on a diverging map centred on 0."""
    n_v, n_l = values.shape
    lo, hi = scale if scale is not None else colour_scale([values])
    diverging = lo < 0
    width = min(3.6 + 0.42 * n_l, 12)
    fig = _new(width, min(2.8 + 0.36 * n_v, 10))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    im = ax.imshow(
        masked,
        origin="lower",
        aspect="auto",
        cmap="RdBu_r" if diverging else "viridis",
        vmin=lo,
        vmax=hi,
        interpolation="nearest",
    )
    xpos, xlab = _ticks(language_labels)
    ypos, ylab = _ticks(vision_labels)
    ax.set_xticks(xpos, xlab, rotation=35, ha="right", rotation_mode="anchor", fontsize=7)
    ax.set_yticks(ypos, ylab, fontsize=7)
    ax.set_xlabel("language layer (relative depth)")
    ax.set_ylabel("vision layer (relative depth)")
    if n_v * n_l <= 100:  # small grids: the numbers in the cells
        for i in range(n_v):
            for j in range(n_l):
                if np.isfinite(values[i, j]):
                    t = (values[i, j] - lo) / (hi - lo) if hi > lo else 0.5
                    dark = abs(t - 0.5) > 0.3 if diverging else t <= 0.5
                    ax.text(
                        j,
                        i,
                        f"{values[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
    if peak is not None:
        i, j = peak
        ax.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.2)
        )
    fig.colorbar(im, ax=ax, label=value_label, shrink=0.9)
    ax.set_title(_wrap(title, width), fontsize=9)
    return fig


def drop_bars(
    path: Path,
    perturbations: list[tuple[str, str, float, float | None, float | None]],
    families: list[tuple[str, float, float | None, float | None]],
    title: str,
    value_label: str,
) -> Path:
    """Horizontal bars of the drop per perturbation (label, family, drop, lo, hi), coloured by
    family, beside a panel of the pooled family drops (family, drop, lo, hi)."""
    rows = max(len(perturbations), len(families), 2)
    fig = _new(10, 1.6 + 0.32 * rows)
    left, right = (
        fig.subplots(1, 2, width_ratios=[3, 2]) if perturbations else (None, fig.add_subplot())
    )
    panels = [(left, perturbations, "per perturbation"), (right, None, "per family (pooled)")]
    for ax, items, name in panels:
        if ax is None:
            continue
        if items is None:
            items = [(f, f, d, lo, hi) for f, d, lo, hi in families]
        if not items:
            ax.text(
                0.5, 0.5, "no pooled family rows", ha="center", va="center", transform=ax.transAxes
            )
            ax.set_axis_off()
            continue
        labels = [it[0] for it in items]
        y = np.arange(len(items))[::-1]
        values = [it[2] for it in items]
        colours = [FAMILY_COLOURS.get(it[1], OTHER) for it in items]
        err = _yerr(values, [it[3] for it in items], [it[4] for it in items])
        ax.barh(y, values, color=colours, xerr=err, capsize=3, ecolor="#333")
        ax.set_yticks(y, labels, fontsize=8)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(value_label)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    present = sorted({it[1] for it in perturbations} | {f[0] for f in families})
    handles = [Patch(color=FAMILY_COLOURS.get(f, OTHER), label=f) for f in present]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(4, len(handles) or 1),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(_wrap(title, 10, 10), fontsize=10)
    return save(fig, path)


DIRECTION_COLOURS = {"text_to_image": "#2171b5", "image_to_text": "#d94801"}


def accuracy_bars(
    path: Path,
    bars: list[tuple[str, str, float, float | None, float | None]],
    chance: float,
    title: str,
) -> Path:
    """Accuracy per group and direction, (group, direction, accuracy, lo, hi) with CI bars:
    a group (a trial kind, or "" for trials without one) of bars side by side, one per
    direction, coloured by direction, and a chance line."""
    groups = list(dict.fromkeys(b[0] for b in bars))
    directions = list(dict.fromkeys(b[1] for b in bars))
    fig = _new(max(4.8, 1.6 + 1.5 * len(groups)), 3.9)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(directions))
    for k, direction in enumerate(directions):
        mine = [(groups.index(b[0]), b) for b in bars if b[1] == direction]
        x = np.array([g for g, _ in mine]) + (k - (len(directions) - 1) / 2) * width
        values = [b[2] for _, b in mine]
        err = _yerr(values, [b[3] for _, b in mine], [b[4] for _, b in mine])
        colour = DIRECTION_COLOURS.get(direction, OTHER)
        ax.bar(x, values, width=width * 0.9, color=colour, yerr=err, capsize=4, label=direction)
        for xi, (_, b) in zip(x, mine, strict=True):
            top = max(b[2], _num(b[4]) if b[4] is not None else b[2])
            ax.text(xi, top + 0.02, f"{b[2]:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance {chance:.2f}")
    ax.set_xticks(np.arange(len(groups)), [g or "all trials" for g in groups])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("accuracy")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(_wrap(title, 4.8), fontsize=9)
    return save(fig, path)


def exemplar_curves(
    path: Path,
    curves: dict[str, list[tuple[int, float, float | None, float | None, float | None]]],
    title: str,
    value_label: str,
) -> Path:
    """Score against k (log2 axis), one line per side with its CI band; side -> rows of
    (k, value, lo, hi, null mean). The permutation null is drawn dotted where present."""
    fig = _new(5.6, 3.8)
    ax = fig.add_subplot()
    ks_all = set()
    for side, rows in curves.items():
        rows = sorted(rows)
        k = np.array([r[0] for r in rows], dtype=float)
        ks_all |= {r[0] for r in rows}
        v = np.array([_num(r[1]) for r in rows])
        lo = np.array([_num(r[2]) for r in rows])
        hi = np.array([_num(r[3]) for r in rows])
        colour = SIDE_COLOURS.get(side, OTHER)
        marker, style = SIDE_STYLES.get(side, ("o", "-"))
        ax.plot(k, v, marker=marker, linestyle=style, color=colour, label=side)
        if np.isfinite(lo).any():
            ax.fill_between(k, lo, hi, color=colour, alpha=0.2, linewidth=0)
        null = np.array([_num(r[4]) for r in rows])
        if np.isfinite(null).any():
            ax.plot(k, null, ":", color=colour, alpha=0.8)
    ax.set_xscale("log", base=2)
    ks = sorted(ks_all)
    ax.set_xticks(ks, [str(x) for x in ks])
    ax.minorticks_off()
    ax.set_xlabel("k (exemplars averaged per concept, log2 scale)")
    ax.set_ylabel(value_label)
    ax.grid(alpha=0.3)
    ax.legend(title="side averaged (dotted: null)", fontsize=8, title_fontsize=8)
    ax.set_title(_wrap(title, 5.6), fontsize=9)
    return save(fig, path)


def retrieval_bars(
    path: Path,
    methods: dict[str, list[tuple[str, float, float | None, float | None, float | None]]],
    title: str,
    labels: list[str] | None = None,
    xlabel: str = "",
) -> Path:
    """Grouped bars of precision per method; method -> rows of (label, value, lo, hi, chance),
    labels (P@k, or bins) in the order given. Chance is a black tick across each bar."""
    labels = labels or sorted({r[0] for rows in methods.values() for r in rows})
    fig_width = min(max(5.0, 0.8 * len(labels) * max(1, len(methods)) + 2.5), 12)
    fig = _new(fig_width, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(labels))
    chance_drawn = False
    order = sorted(
        methods,
        key=lambda m: (
            list(METHOD_COLOURS).index(m) if m in METHOD_COLOURS else len(METHOD_COLOURS),
            m,
        ),
    )
    for m, method in enumerate(order):
        rows = methods[method]
        by = {r[0]: r for r in rows}
        xs = [
            xi + (m - (len(methods) - 1) / 2) * width
            for xi, lab in zip(x, labels, strict=True)
            if lab in by
        ]
        rs = [by[lab] for lab in labels if lab in by]
        values = [r[1] for r in rs]
        err = _yerr(values, [r[2] for r in rs], [r[3] for r in rs])
        ax.bar(
            xs,
            values,
            width=width * 0.95,
            color=METHOD_COLOURS.get(method, OTHER),
            yerr=err,
            capsize=3,
            label=method,
        )
        for xi, r in zip(xs, rs, strict=True):
            if r[4] is not None:
                ax.hlines(
                    r[4],
                    xi - width / 2,
                    xi + width / 2,
                    color="black",
                    linewidth=2,
                    label=None if chance_drawn else "chance",
                )
                chance_drawn = True
    ax.set_xticks(x, labels)
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("precision")
    fig.legend(fontsize=8, loc="outside right upper", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(_wrap(title, fig_width - 1), fontsize=9)
    return save(fig, path)


SELECTION_COLOURS = {"deepest": "#2171b5", "best": "#d94801"}


def calibrated_bars(
    path: Path,
    pairs: list[tuple[str, bool, dict[str, tuple[float, float | None, float | None]]]],
    title: str,
    value_label: str,
) -> Path:
    """Horizontal bars of each pair's calibrated score with its CI, one bar per layer
    selection: ``pairs`` holds (label, is_control, {selection: (score, lo, hi)}); controls'
    bars are hatched."""
    selections = [s for s in SELECTION_COLOURS if any(s in p[2] for p in pairs)]
    fig = _new(8, 1.4 + 0.45 * len(pairs) * max(1, len(selections)))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(selections))
    y = np.arange(len(pairs))[::-1]
    for k, selection in enumerate(selections):
        got = [(yi, p[2][selection]) for yi, p in zip(y, pairs, strict=True) if selection in p[2]]
        if not got:
            continue
        ys = np.array([g[0] for g in got]) + (k - (len(selections) - 1) / 2) * height
        values = [g[1][0] for g in got]
        err = _yerr(values, [g[1][1] for g in got], [g[1][2] for g in got])
        hatches = ["//" if pairs[len(pairs) - 1 - int(g[0])][1] else "" for g in got]
        bars = ax.barh(
            ys,
            values,
            height=height,
            color=SELECTION_COLOURS[selection],
            xerr=err,
            capsize=3,
            ecolor="#333",
            label=f"{selection} layer pair",
        )
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
    ax.set_yticks(y, [p[0] for p in pairs], fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(value_label)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(_wrap(title, 8), fontsize=9)
    return save(fig, path)


def series_plot(
    path: Path,
    series: dict[str, list[tuple[str, float, float, float | None, float | None]]],
    title: str,
    value_label: str,
) -> Path:
    """Calibrated score against ImageNet top-1 accuracy, one line per layer selection:
    ``series`` maps a selection to (model, accuracy, score, lo, hi) in accuracy order."""
    fig = _new(6, 4.2)
    ax = fig.add_subplot()
    markers = {"deepest": "s", "best": "o"}
    for k, (selection, points) in enumerate(series.items()):
        # side by side where both selections pick the same layers (the same points)
        x = [p[1] + 0.04 * (k - (len(series) - 1) / 2) for p in points]
        values = [p[2] for p in points]
        err = _yerr(values, [p[3] for p in points], [p[4] for p in points])
        ax.errorbar(
            x,
            values,
            yerr=err,
            marker=markers.get(selection, "o"),
            capsize=4,
            color=SELECTION_COLOURS.get(selection, OTHER),
            label=f"{selection} layer pair",
        )
        for p in points:
            ax.annotate(p[0], (p[1], p[2]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("ImageNet top-1 accuracy (%)")
    ax.set_ylabel(value_label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(_wrap(title, 6), fontsize=9)
    return save(fig, path)
