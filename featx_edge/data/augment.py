"""Fixed augmented views of training images, seeded per image and view so they can be cached.

``--augment-views K`` embeds K extra views of every training image once; the head then trains on
the original features plus the K views' features (validation and test stay un-augmented). A view
is a pure function of (augment seed, the image's relative path, view index, the transforms): the
same run settings give the same pixels, so the views' features are cached on disk like the
originals' (``featx_edge.training.features``).

The transforms (applied in this order, on the decoded image at its own resolution, then resized
to the model size the runtime's way, bilinear):

- ``flip``: a horizontal mirror, half of the views. Wrong for data whose meaning changes when
  mirrored (digits, letters, text, left/right classes): not in the default list.
- ``crop``: a crop of 75-100% of each side at a random place (aspect within 0.75..1.33), then
  stretched back to the model size (a zoom of up to 1.33x).
- ``rotate``: up to +-10 degrees, the corners filled with the image's median border colour.
- ``color``: brightness, contrast and saturation each scaled by 0.8..1.2.

Every view draws the same random numbers whichever transforms are enabled, so removing one
transform leaves the others' choices unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from featx_edge.errors import ConfigError, DataError, ImageError
from featx_edge.runtime.image import load_pixels, open_image

TRANSFORMS = ("flip", "crop", "rotate", "color")
DEFAULT_TRANSFORMS = ("rotate", "color")
"""No ``flip`` by default: it turns a 2 into something else, and it cannot be told from the data.
No ``crop`` by default either: on the sample digits, which fill their frame, it cut strokes off and
cost 3-4 test points (significant; ``benchmarks/augment_views.py``). Add it for photos with margins."""

AUGMENT_VERSION = 1
"""Bumped when what a view looks like changes, so cached view features are not reused."""

CROP_SIDE = (0.75, 1.0)
MAX_ROTATION_DEGREES = 10.0
COLOR_FACTOR = (0.8, 1.2)


def parse_transforms(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"crop,rotate"`` or ``["crop", "rotate"]`` -> ("crop", "rotate"); ConfigError for unknown names.

    Example:
        >>> parse_transforms("flip, crop")
        ('flip', 'crop')
    """
    names = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(name, str) for name in names):
        raise ConfigError(f"`augment` must list transform names ({', '.join(TRANSFORMS)}); received `{value!r}`.")
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in TRANSFORMS]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(
            f"`augment` (`--augment`) must be a comma-separated list of distinct transforms from "
            f"{', '.join(TRANSFORMS)}; received `{value if isinstance(value, str) else ','.join(map(str, value))}`. "
            f"Example: `--augment crop,rotate,color` (add `flip` only where a mirrored image keeps its class)."
        )
    return tuple(name for name in TRANSFORMS if name in names)  # one canonical order


@dataclass(frozen=True)
class AugmentSpec:
    """Which transforms the views use and the seed they derive from (part of the cache key)."""

    transforms: tuple[str, ...] = DEFAULT_TRANSFORMS
    seed: int = 0

    def describe(self) -> dict:
        """What the manifest records: enough to say how every view was made."""
        return {"version": AUGMENT_VERSION, "transforms": list(self.transforms), "seed": self.seed,
                "per_view_seed": "numpy default_rng([seed, view, first 8 bytes of sha256(relative path)])",
                "crop_side": list(CROP_SIDE), "max_rotation_degrees": MAX_ROTATION_DEGREES,
                "color_factor": list(COLOR_FACTOR), "flip_probability": 0.5, "resize": "bilinear"}


def view_choices(spec: AugmentSpec, relpath: str, view: int) -> dict:
    """The random choices of one view of one image (all drawn, whichever transforms are on)."""
    path_seed = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng([spec.seed, view, path_seed])
    draws = {
        "flip": bool(rng.random() < 0.5),
        "crop_side": rng.uniform(*CROP_SIDE, size=2),  # width and height fractions
        "crop_at": rng.random(2),
        "angle": float(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)),
        "color": rng.uniform(*COLOR_FACTOR, size=3),  # brightness, contrast, saturation
    }
    return draws


def augment_image(image: Image.Image, *, spec: AugmentSpec, relpath: str, view: int) -> Image.Image:
    """One view of an RGB image, at its own resolution (not yet resized)."""
    draws = view_choices(spec, relpath, view)
    if "flip" in spec.transforms and draws["flip"]:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if "crop" in spec.transforms:
        width, height = image.size
        crop_w = max(1, round(width * draws["crop_side"][0]))
        crop_h = max(1, round(height * draws["crop_side"][1]))
        left = round((width - crop_w) * draws["crop_at"][0])
        top = round((height - crop_h) * draws["crop_at"][1])
        image = image.crop((left, top, left + crop_w, top + crop_h))
    if "rotate" in spec.transforms:
        image = image.rotate(draws["angle"], resample=Image.Resampling.BILINEAR, fillcolor=_border_colour(image))
    if "color" in spec.transforms:
        brightness, contrast, saturation = (float(f) for f in draws["color"])
        image = ImageEnhance.Brightness(image).enhance(brightness)
        image = ImageEnhance.Contrast(image).enhance(contrast)
        image = ImageEnhance.Color(image).enhance(saturation)
    return image


def augmented_pixels(root: Path, relpath: str, *, size: int, spec: AugmentSpec, view: int) -> np.ndarray:
    """View ``view`` (1..K) of ``root/relpath`` as uint8 (size, size, 3), resized as the runtime resizes."""
    try:
        image = open_image(root / relpath)
    except ImageError as err:
        raise DataError(f"{err}. The file changed since the run was split; restore it or re-run training.") from err
    return load_pixels(augment_image(image, spec=spec, relpath=relpath, view=view), height=size, width=size)


def _border_colour(image: Image.Image) -> tuple[int, int, int]:
    """The median colour of the outermost pixels (white paper stays white after a rotation)."""
    arr = np.asarray(image)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))
