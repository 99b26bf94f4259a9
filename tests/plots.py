"""Figures checked by what they show, not by their existence: a written PNG is read back
(matplotlib.image.imread) and must have about the size it was drawn at and show the colour of
every series it should hold (and none it should not)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
from matplotlib import colors

DPI = 150  # src.results.save_figure


def colour_pixels(path: Path, inches: tuple[float, float], colours: dict, tol: float = 0.2) -> dict:
    """Read the PNG at `path`, check that it is `inches` (width, height) at 150 dpi within `tol`
    (bbox_inches="tight" trims or pads the margins a little), and count the pixels that show each
    colour of `colours` ({name: matplotlib colour, or (colour, alpha) for a translucent mark
    over white}) to within 2% per channel."""
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), f"{path}: not an RGB(A) image"
    height, width = img.shape[:2]
    want_w, want_h = inches[0] * DPI, inches[1] * DPI
    assert abs(width - want_w) <= tol * want_w and abs(height - want_h) <= tol * want_h, (
        f"{path}: {width}x{height} pixels, drawn as {want_w:.0f}x{want_h:.0f}"
    )
    rgb = img[..., :3]
    counts = {}
    for name, spec in colours.items():
        colour, alpha = spec if isinstance(spec, tuple) else (spec, 1.0)
        target = alpha * np.array(colors.to_rgb(colour)) + (1 - alpha)
        counts[name] = int((np.abs(rgb - target).max(-1) < 0.02).sum())
    return counts
