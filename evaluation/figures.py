"""Figures in the paper's layout (Figure 5) and the qualitative grid, as PNGs (matplotlib Agg).

- ``timestep_curve.png``: mIoU per timestep index (0 = noisiest), averaged over blocks.
- ``layer_curve.png``: mIoU per block, averaged over timesteps.
- ``heatmap.png``: the T x L mask-mIoU table with the best cell marked.
- ``denoising_gain.png``: one-step x0 prediction vs the noisy input per timestep (PSNR, gms)
  and their difference, the denoising gain (models/denoising_gain.py).
- :func:`correspondence_overlay` draws one reference with its heat map, the ground-truth
  contour and the predicted box; :func:`correspondence_image` renders that alone at the
  reference's pixel size; :func:`qualitative_grid` lays out whole cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _curve(x: Sequence[int], curves: dict[str, Sequence[float]], xlabel: str, title: str,
           path: str | Path, baselines: dict[str, dict[str, float]] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind, marker in (("mask", "o"), ("box", "s")):
        ax.plot(x, curves[kind], marker=marker, markersize=3, label=f"{kind} mIoU")
    for (name, scores), style in zip((baselines or {}).items(), (":", "-.", "--"), strict=False):
        ax.axhline(scores["miou_mask"], linestyle=style, color="grey", linewidth=1,
                   label=f"{name} (mask)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mIoU")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def timestep_curve(curves: dict[str, Sequence[float]], path: str | Path,
                   baselines: dict[str, dict[str, float]] | None = None) -> Path:
    """Figure 5 (left): mIoU by timestep index, 0 = noisiest, averaged over blocks."""
    x = list(range(len(curves["mask"])))
    return _curve(x, curves, "timestep index (0 = noisiest)", "mIoU by timestep", path,
                  baselines)


def layer_curve(curves: dict[str, Sequence[float]], layers: Sequence[int], path: str | Path,
                baselines: dict[str, dict[str, float]] | None = None) -> Path:
    """Figure 5 (middle): mIoU by cross-attention block, averaged over timesteps."""
    return _curve(list(layers), curves, "cross-attention block", "mIoU by block", path,
                  baselines)


def table_heatmap(table: np.ndarray, best: dict[str, Any], layers: Sequence[int],
                  path: str | Path, title: str = "mask mIoU (timestep x block)") -> Path:
    """Figure 5 (right): the T x L table, best cell boxed in red."""
    table = np.asarray(table)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(layers) + 2), 5))
    im = ax.imshow(table, aspect="auto", cmap="viridis", origin="upper")
    fig.colorbar(im, ax=ax, label="mIoU")
    li = list(layers).index(best["layer"])
    ax.add_patch(Rectangle((li - 0.5, best["t_index"] - 0.5), 1, 1, fill=False, edgecolor="red",
                           linewidth=2))
    ax.set_xticks(range(len(layers)), [str(v) for v in layers])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("cross-attention block")
    ax.set_ylabel("timestep index (0 = noisiest)")
    ax.set_title(f"{title}\nbest: t={best['t']} (index {best['t_index']}), block "
                 f"{best['layer']}, {best['miou_mask']:.3f}")
    return _save(fig, path)


def denoising_gain_curve(section: dict[str, Any], path: str | Path) -> Path:
    """PSNR and gms of the noisy input (dashed) and the x0 prediction per reference against
    t (top), and the gain with its standard error (bottom); ``section`` as
    evaluation.denoising_gain.measure_cases returns it."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    labels = {"psnr": "PSNR in the mask's box (dB)", "gms": "gms in the mask"}
    drawn_noisy = False
    for ref, node in section["references"].items():
        rows = node["rows"]
        if not rows:
            continue
        t = [r["t"] for r in rows]
        for col, metric in enumerate(("psnr", "gms")):
            top, bottom = axes[0, col], axes[1, col]
            if not drawn_noisy:
                top.plot(t, [r[f"{metric}_noisy"] for r in rows], "--", color="grey",
                         marker="o", markersize=3, label="noisy input")
            top.plot(t, [r[f"{metric}_x0"] for r in rows], marker="o", markersize=3,
                     label=f"x0 prediction ({ref} reference, {node['num_cases']} cases)")
            bottom.errorbar(t, [r[f"{metric}_gain"] for r in rows],
                            yerr=[r[f"{metric}_gain_se"] for r in rows], marker="o",
                            markersize=3, capsize=2, label=f"{ref} reference")
            top.set_ylabel(labels[metric])
            bottom.set_ylabel(f"gain ({'dB' if metric == 'psnr' else 'gms'})")
        drawn_noisy = True
    ticks = section["timesteps"]
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("timestep t (training schedule)")
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle(f"Denoising gain: one-step x0 vs the noisy input "
                 f"({section['prediction_type']}, {section['space']} space)")
    return _save(fig, path)


def correspondence_overlay(ax: Axes, reference: np.ndarray, heat: np.ndarray | None = None,
                           gt_mask: np.ndarray | None = None,
                           box: Sequence[int] | None = None, title: str | None = None) -> Axes:
    """Reference with the heat map (jet, translucent), GT contour (white) and box (red).

    ``box`` is whatever the caller crops with (eval.py passes the margin-grown box).
    """
    ax.imshow(reference)
    if heat is not None:
        ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    if gt_mask is not None and gt_mask.any():
        ax.contour(gt_mask.astype(float), levels=[0.5], colors="white", linewidths=1.2)
    if box is not None:
        x0, y0, x1, y1 = (int(v) for v in box)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               edgecolor="red", linewidth=1.5))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def correspondence_image(reference: np.ndarray, heat: np.ndarray | None = None,
                         box: Sequence[int] | None = None) -> np.ndarray:
    """The reference with its heat map and box drawn over, as uint8 HxWx3 at its own size.

    A pyplot-free figure, so a server thread (the demo) can render while another one does.
    """
    height, width = reference.shape[:2]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    canvas = FigureCanvasAgg(fig)
    correspondence_overlay(fig.add_axes((0, 0, 1, 1)), reference, heat, box=box)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def qualitative_grid(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One row per case: input, mask, reference overlay, each method's output, target.

    Each row: ``id``, ``image``, ``mask``, ``reference`` (uint8/bool arrays), optional
    ``heat``, ``reference_mask``, ``box``, ``outputs`` ({method: uint8 HxWx3}), ``target``.
    """
    methods: list[str] = []
    for row in rows:
        methods += [m for m in row.get("outputs", {}) if m not in methods]
    fixed = ("input", "mask", "alignment", "target")
    methods = [m for m in methods if m not in fixed]  # the "input" method is the input column
    cols = ["input", "mask", "alignment", *methods, "target"]
    fig, axes = plt.subplots(max(1, len(rows)), len(cols),
                             figsize=(1.9 * len(cols), 1.9 * max(1, len(rows))), squeeze=False)
    for r, row in enumerate(rows):
        cells = {"input": row["image"], "mask": row["mask"], "target": row.get("target"),
                 **row.get("outputs", {})}
        for c, col in enumerate(cols):
            ax = axes[r, c]
            ax.set_axis_off()
            if col == "alignment":
                correspondence_overlay(ax, row["reference"], row.get("heat"),
                                       row.get("reference_mask"), row.get("box"))
            elif cells.get(col) is not None:
                ax.imshow(cells[col], cmap="gray" if col == "mask" else None)
            if r == 0:
                ax.set_title(col, fontsize=8)
        axes[r, 0].text(-0.05, 0.5, row["id"], transform=axes[r, 0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=7)
    return _save(fig, path)
