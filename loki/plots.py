"""Figures: where the selected rows sit (the paper's Figure 2 view), and logging a figure to a logger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loki.store import ScoreStore


def selected_positions(store: ScoreStore, q: float, highest: bool) -> list[list[int]]:
    """The layer-balanced lowest (or highest) q of rows per layer, streamed from the store."""
    from loki.select import select_positions

    strategy = "layer_balanced_highest" if highest else "layer_balanced"
    return [sorted(int(i) for i in layer) for layer in select_positions(store.iter_chunks(), q, strategy=strategy)]


def selection_heatmap(store: ScoreStore, q: float = 0.05, path: str | Path | None = None, max_bins: int = 256):
    """Figure (two panels, layers x rows): where the lowest and the highest q of rows sit in each layer.

    Rows are grouped into at most `max_bins` bins; a cell's colour is the fraction of its rows selected.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, rows = store.shape
    bins = min(rows, max_bins)
    bin_of_row = torch.arange(rows) * bins // rows
    rows_per_bin = torch.bincount(bin_of_row, minlength=bins).float()
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.18 * layers + 1.5)), sharey=True, constrained_layout=True)
    for ax, highest in zip(axes, (False, True)):
        grid = torch.zeros(layers, bins)
        for layer, selected in enumerate(selected_positions(store, q, highest)):
            grid[layer] = (
                torch.bincount(bin_of_row[torch.as_tensor(selected, dtype=torch.long)], minlength=bins).float()
                / rows_per_bin
            )
        image = ax.imshow(
            grid.numpy(),
            aspect="auto",
            origin="lower",
            cmap="viridis",
            vmin=0.0,
            interpolation="nearest",
            extent=(0, rows, -0.5, layers - 0.5),
        )
        ax.set_title(f"{'highest' if highest else 'lowest'} {q:.0%} of rows per layer")
        ax.set_xlabel(f"row of down_proj.weight (knowledge vector, {bins} bins)")
        fig.colorbar(image, ax=ax, label="fraction selected")
    axes[0].set_ylabel("layer")
    fig.suptitle(f"KVA positions: {store.meta['model']['name']}, {store.num_samples} samples")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def log_figure(logger: Any, fig: Any, path: Path, key: str = "attribution/heatmap") -> bool:
    """Log the heatmap to W&B (image) or TensorBoard (figure); other loggers have no image support."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)])
        return True
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_figure(key, fig)
        return True
    return False
