"""The report's pictures as PNG bytes: training curves (matplotlib, Agg) and image thumbnails (Pillow)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

log = logging.getLogger(__name__)

THUMB = 64
"""Thumbnail size in pixels (longest side)."""

_METRICS = (("loss", "loss"), ("accuracy", "accuracy"))


def _series(stages: list[tuple[str, dict]], key: str) -> tuple[list[float], list[float]]:
    """The values of ``key`` over the stages, one after the other, with their epoch numbers (1-based)."""
    xs: list[float] = []
    ys: list[float] = []
    offset = 0
    for _, history in stages:
        values = history.get(key) or []
        for i, v in enumerate(values):
            if isinstance(v, (int, float)):
                xs.append(offset + i + 1)
                ys.append(float(v))
        offset += max((len(h) for h in history.values() if isinstance(h, list)), default=0)
    return xs, ys


def training_curves_png(stages: list[tuple[str, dict]]) -> bytes:
    """Loss and accuracy, train and validation, per epoch; later stages continue the epoch axis.

    Args:
        stages: (name, Keras history dict) in training order, e.g. ``[("stage 1 (head)", {...})]``.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    for col, (key, title) in enumerate(_METRICS):
        ax = fig.add_subplot(1, 2, col + 1)
        for prefix, name, style in (("", "train", "-"), ("val_", "validation", "--")):
            xs, ys = _series(stages, prefix + key)
            if xs:
                ax.plot(xs, ys, style, label=name, linewidth=1.5)
        offset = 0
        for i, (stage_name, history) in enumerate(stages):
            if i:
                ax.axvline(offset + 0.5, color="0.5", linestyle=":", linewidth=1)
                ax.annotate(stage_name, (offset + 0.5, 0.98), xycoords=("data", "axes fraction"), fontsize=7,
                            color="0.35", va="top", ha="left")
            offset += max((len(h) for h in history.values() if isinstance(h, list)), default=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def thumbnail_png(path: Path) -> bytes | None:
    """A PNG thumbnail of the image at ``path`` (longest side ``THUMB`` px); None if it cannot be read."""
    from PIL import Image

    from featx_edge.errors import ImageError
    from featx_edge.runtime.image import to_rgb_image

    try:
        img = to_rgb_image(path)
    except (ImageError, OSError, ValueError) as err:
        log.warning("no thumbnail for %s: %s", path, err)
        return None
    scale = THUMB / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    # Small images (digits are 32 px) are enlarged with square pixels; large ones averaged down.
    img = img.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
