"""Image decoding and resizing shared by training and the device runtime (Pillow + numpy only).

Training and the device go through the same function, so a model sees the same pixels
on the device as it saw during training.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featx_edge.errors import ImageError

ImageInput = str | os.PathLike | Image.Image | np.ndarray

RESIZE_METHOD = "bilinear"
"""Recorded in every model's input contract: images are stretched to the model size, bilinear."""

_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, raising ImageError with the reason on failure.

    Truncated files, decompression bombs (more than ``Image.MAX_IMAGE_PIXELS``) and files
    that are not images all raise ImageError; nothing is returned half-decoded.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({err})") from err
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: unreadable or truncated image ({err})") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, P, RGBA, LA, CMYK, 16-bit, ...) to 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img.copy()
    if img.mode in _HIGH_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def to_rgb_image(image: ImageInput) -> Image.Image:
    """Accept a path, a PIL image or a uint8 array (HxW, HxWx1, HxWx3, HxWx4) and return RGB."""
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ImageError(
                f"array images must be uint8 (0..255); received dtype {arr.dtype}. "
                "Convert with `np.clip(x, 0, 255).astype(np.uint8)`."
            )
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            return Image.fromarray(arr).convert("RGB")
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            return _to_rgb(Image.fromarray(arr))
        raise ImageError(f"array images must be HxW, HxWx1, HxWx3 or HxWx4; received shape {arr.shape}.")
    raise ImageError(
        f"cannot read an image from {type(image).__name__}; pass a file path, a PIL image or a uint8 array."
    )


def load_pixels(image: ImageInput, *, height: int, width: int) -> np.ndarray:
    """Decode ``image``, convert to RGB and resize to (height, width): a uint8 HxWx3 array."""
    rgb = to_rgb_image(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
