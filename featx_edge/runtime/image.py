"""Image decoding and resizing shared by training and the device runtime (Pillow + numpy only).

Training and the device go through the same function, so a model sees the same pixels
on the device as it saw during training.

High bit depths are scaled by the bit depth of the image's mode, never by its content (a dark
image stays dark): ``I;16*`` by 65535; ``I`` (how older Pillow opens 16-bit PNGs; also 32-bit
integer TIFFs) by 65535 too, values outside 0..65535 clipped; ``F`` (32-bit float) is read on
Pillow's own 0..255 scale, as ``Image.convert("L")`` does: values clipped to 0..255, NaN as 0.
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

_FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 255.0}
"""The value that maps to 255 for each high-bit mode (see the module docstring)."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file, raising ImageError with the reason on failure.

    Truncated files, decompression bombs (more than ``Image.MAX_IMAGE_PIXELS``), files that are
    not images and files whose metadata Pillow cannot handle (e.g. malformed EXIF) all raise
    ImageError naming the file; nothing is returned half-decoded.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
    except ImageError as err:
        raise ImageError(f"{path}: {err}") from err
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({err})") from err
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"{path}: unreadable or truncated image ({type(err).__name__}: {err})") from err


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; ImageError when the metadata is malformed."""
    img.load()  # decoding errors first, so that they are not reported as EXIF errors
    try:
        return ImageOps.exif_transpose(img)
    except Exception as err:  # malformed EXIF raises struct.error, TypeError, ValueError, ... from Pillow
        raise ImageError(
            f"malformed EXIF metadata ({type(err).__name__}: {err}); re-save the image without EXIF"
        ) from err


def _high_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images to 8-bit RGB, scaled by the mode's full scale."""
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
    arr = np.clip(arr * (255.0 / _FULL_SCALE[img.mode]) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode (L, P, RGBA, LA, CMYK, 16-bit, ...) to 8-bit RGB."""
    img = _upright(img)
    if img.mode == "RGB":
        return img.copy()
    if img.mode in _FULL_SCALE:
        return _high_bit_to_rgb(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """``_to_rgb`` for a PIL image passed in directly: every failure is an ImageError naming it."""
    name = getattr(img, "filename", "") or f"PIL image (mode {img.mode}, {img.width}x{img.height})"
    try:
        return _to_rgb(img)
    except ImageError as err:
        raise ImageError(f"{name}: {err}") from err
    except Exception as err:  # lazy decoding and conversions raise OSError, ValueError, ...
        raise ImageError(f"{name}: cannot be decoded or converted to RGB ({type(err).__name__}: {err})") from err


def _array_to_rgb(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageError(
            f"array images must be uint8 (0..255); received dtype {arr.dtype}. "
            "Convert with `np.clip(x, 0, 255).astype(np.uint8)`."
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
        raise ImageError(
            f"array images must be HxW, HxWx1, HxWx3 or HxWx4 with H, W >= 1; received shape {arr.shape}."
        )
    if arr.ndim == 2:
        return Image.fromarray(arr).convert("RGB")
    return _to_rgb(Image.fromarray(arr))


def to_rgb_image(image: ImageInput) -> Image.Image:
    """Accept a path, a PIL image or a uint8 array (HxW, HxWx1, HxWx3, HxWx4) and return RGB.

    Raises:
        ImageError: for anything that cannot be decoded or converted, naming the file.
    """
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ImageError(
        f"cannot read an image from {type(image).__name__}; pass a file path, a PIL image or a uint8 array."
    )


def load_pixels(image: ImageInput, *, height: int, width: int) -> np.ndarray:
    """Decode ``image``, convert to RGB and resize to (height, width): a uint8 HxWx3 array."""
    rgb = to_rgb_image(image)
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), resample=Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
