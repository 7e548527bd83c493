"""The pipeline's figures as small PNGs: evaluation plots, training curves, label counts and contact sheets.

Every figure is rendered at a modest size and stored as a palette PNG, so that it can travel inside a UI's
metadata (the Dagster asset pages) or a tracking run, and be seen by someone who is not on the machine that ran the
job. `per_class_ap_plot`, `precision_recall_curves` and `reliability_diagram` write a file (the evaluation plots);
the others return PNG bytes.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from mumic_ml.io import atomic_write_bytes  # noqa: E402

DPI = 90
PALETTE_COLOURS = 256
BAR_COLOUR = "#4c72b0"
SPLIT_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def png_bytes(fig) -> bytes:
    """The figure as a palette PNG (a tenth of the RGBA bytes for a chart), and the figure closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return compact_png(Image.open(io.BytesIO(buffer.getvalue())))


def compact_png(image: Image.Image) -> bytes:
    """An image as a palette PNG: charts keep their few colours exactly, photos get a dithered 256-colour palette."""
    buffer = io.BytesIO()
    image.convert("RGB").quantize(PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT).save(
        buffer, format="PNG", optimize=True
    )
    return buffer.getvalue()


def fit_png(png: bytes, max_bytes: int) -> bytes:
    """`png` unchanged if it fits in `max_bytes`, else scaled down until it does (a chart with many classes)."""
    image = Image.open(io.BytesIO(png))
    while len(png) > max_bytes and min(image.size) > 16:
        image = image.resize((max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)), Image.Resampling.LANCZOS)
        png = compact_png(image)
    return png


def _save(fig, path: Path) -> Path:
    atomic_write_bytes(path, png_bytes(fig))
    return path


def _per_class_ap_figure(per_class_ap: Mapping[str, float | None]):
    items = sorted(((n, v) for n, v in per_class_ap.items() if v is not None), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.2 * len(items))))
    ax.barh([n for n, _ in items], [v for _, v in items], color=BAR_COLOUR)
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision (test split)")
    ax.set_title("Per-class AP")
    ax.tick_params(axis="y", labelsize=7)
    return fig


def per_class_ap_plot(per_class_ap: Mapping[str, float | None], path: Path) -> Path:
    return _save(_per_class_ap_figure(per_class_ap), path)


def precision_recall_curves(
    scores: np.ndarray, targets: np.ndarray, class_names: list[str], path: Path, top_n: int = 8
) -> Path:
    """PR curves of the `top_n` most frequent classes: where the operating thresholds can sit."""
    order = np.argsort(-targets.sum(axis=0), kind="stable")[:top_n]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for j in order:
        if targets[:, j].sum() == 0:
            continue
        rank = np.argsort(-scores[:, j], kind="stable")
        hits = targets[rank, j]
        tp = np.cumsum(hits)
        precision = tp / np.arange(1, len(hits) + 1)
        recall = tp / hits.sum()
        ax.plot(recall, precision, label=class_names[j])
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Precision-recall, most frequent classes")
    return _save(fig, path)


def _reliability_panel(top, bottom, summary: Mapping[str, Any], title: str) -> None:
    bins = summary["bins"]
    width = bins[0]["upper"] - bins[0]["lower"]
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    filled = [(c, b) for c, b in zip(centres, bins) if b["count"]]
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    top.bar(
        [c for c, _ in filled],
        [b["frequency"] for _, b in filled],
        width=width * 0.9,
        color=BAR_COLOUR,
        label="fraction positive",
    )
    top.plot(
        [c for c, _ in filled],
        [b["confidence"] for _, b in filled],
        "o",
        color=SPLIT_COLOURS[3],
        ms=3,
        label="mean probability",
    )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(f"{title}: ECE {summary['ece']:.3f}, MCE {summary['mce']:.3f}", fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    top.tick_params(labelbottom=False)
    bottom.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="#8c8c8c")
    bottom.set_yscale("symlog", linthresh=1)
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("entries", fontsize=7)


def reliability_diagram(before: Mapping[str, Any], after: Mapping[str, Any], path: Path) -> Path:
    """Per probability bin, the fraction of (image, class) entries that are positive against their mean probability,
    with each bin's count below, before and after the post-hoc calibration (`metrics.calibration_summary`)."""
    fig, axes = plt.subplots(
        2, 2, figsize=(8.5, 4.5), sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08}
    )
    _reliability_panel(axes[0, 0], axes[1, 0], before, "raw")
    _reliability_panel(axes[0, 1], axes[1, 1], after, "calibrated")
    axes[0, 0].set_ylabel("fraction positive")
    return _save(fig, path)


def training_curves(history: Sequence[Mapping[str, Any]], gap_k: int, best_epoch: int | None = None) -> bytes:
    """Training loss and validation GAP@k / mAP per epoch (numbered from 1), the best epoch marked: whether the
    run was still improving, over-fitting or flat."""
    epochs = [entry["epoch"] + 1 for entry in history]
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(8, 3))
    loss_ax.plot(epochs, [entry["train_loss"] for entry in history], marker="o", color=BAR_COLOUR)
    loss_ax.set_title("training loss")
    val_ax.plot(epochs, [entry["val_gap_at_k"] for entry in history], marker="o", label=f"GAP@{gap_k}")
    if all(entry.get("val_map") is not None for entry in history):
        val_ax.plot(epochs, [entry["val_map"] for entry in history], marker="s", label="mAP")
    val_ax.set_title("validation")
    val_ax.set_ylim(0, 1)
    if best_epoch is not None:
        val_ax.axvline(best_epoch + 1, color="grey", linestyle=":", label="best epoch")
    val_ax.legend(fontsize=7, loc="lower right")
    for ax in (loss_ax, val_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return png_bytes(fig)


def label_histogram(label_counts: Mapping[str, int]) -> bytes:
    """Images per class, most frequent first: the long tail a rare-class expectation warns about."""
    items = sorted(label_counts.items(), key=lambda kv: (-kv[1], kv[0]))
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.2 * len(items))))
    ax.barh([n for n, _ in items][::-1], [v for _, v in items][::-1], color=BAR_COLOUR)
    ax.set_xlabel("images")
    ax.set_title("Images per class")
    ax.tick_params(axis="y", labelsize=7)
    return png_bytes(fig)


def positives_per_split(positives: Mapping[str, Mapping[str, int]]) -> bytes:
    """Positives per class in each split, side by side: a class missing from val or test cannot be measured."""
    splits = list(positives)
    totals = {c: sum(positives[s].get(c, 0) for s in splits) for counts in positives.values() for c in counts}
    classes = sorted(totals, key=lambda c: (-totals[c], c))[::-1]  # barh draws upwards: most frequent on top
    height = 0.8 / max(1, len(splits))
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.25 * len(classes))))
    rows = np.arange(len(classes))
    for i, split in enumerate(splits):
        counts = [positives[split].get(c, 0) for c in classes]
        colour = SPLIT_COLOURS[i % len(SPLIT_COLOURS)]
        ax.barh(rows + (len(splits) - 1 - i) * height, counts, height=height, label=split, color=colour)
    ax.set_yticks(rows + height * (len(splits) - 1) / 2, classes)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("positive images")
    ax.set_title("Positives per class by split")
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)


@dataclass(frozen=True)
class Tile:
    """One cell of a contact sheet: a thumbnail and the words under it; without a thumbnail (a file that cannot be
    decoded) a grey box says `placeholder` instead."""

    image: Image.Image | None
    caption: str
    placeholder: str = "cannot be shown"


def contact_sheet(tiles: Sequence[Tile], title: str, *, columns: int = 4) -> bytes:
    """Thumbnails in a grid with their captions; a tile without an image shows its caption in a grey box."""
    rows = max(1, -(-len(tiles) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.7, rows * 2.2), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, tile in zip(axes.flat, tiles):
        caption = "\n".join(textwrap.wrap(tile.caption, 26, max_lines=4, placeholder=" ..."))
        if tile.image is None:
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("#e6e6e6")
            text = "\n".join(textwrap.wrap(tile.placeholder, 22, max_lines=6, placeholder=" ..."))
            ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=6, transform=ax.transAxes)
        else:
            ax.imshow(np.asarray(tile.image.convert("RGB")))
        ax.set_title(caption, fontsize=6, y=-0.02, pad=0, va="top")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(hspace=0.9, wspace=0.1)
    return png_bytes(fig)
