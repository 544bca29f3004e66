"""Property-based tests of the image loader shared by training and the device runtime.

Whatever a file holds, ``load_pixels`` returns a uint8 (H, W, 3) array of the requested size or
raises ImageError: never another exception (a traceback in the scan or in `predict DIR`).
Bounded and derandomized: the same examples on every run, a few seconds in all.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featx_edge.errors import ImageError
from featx_edge.runtime.image import load_pixels

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# (Pillow format, file extension, modes it writes): every pair here is a valid image file.
WRITERS = [
    ("PNG", ".png", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]),
    ("JPEG", ".jpg", ["L", "RGB", "CMYK"]),
    ("TIFF", ".tiff", ["1", "L", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]),
    ("WEBP", ".webp", ["RGB", "RGBA"]),
    ("BMP", ".bmp", ["1", "L", "P", "RGB"]),
    ("GIF", ".gif", ["L", "P"]),
]
FORMAT_MODES = [(fmt, ext, mode) for fmt, ext, modes in WRITERS for mode in modes]
EXIF_FORMATS = {"PNG", "JPEG", "TIFF", "WEBP"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One folder for every example (hypothesis runs many examples per test function), and a low
    decompression-bomb limit so that a mutated header cannot make an example decode 89 M pixels."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 1 << 20)
        yield tmp_path_factory.mktemp("fuzz")


_names = itertools.count()


def _write(folder, data: bytes, ext: str):
    path = folder / f"{next(_names)}{ext}"
    path.write_bytes(data)
    return path


def _load(image, height: int, width: int) -> None:
    """The property: a uint8 array of the requested size, or ImageError (pytest fails on anything else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF and the like; the result counts
        try:
            pixels = load_pixels(image, height=height, width=width)
        except ImageError:
            return
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.shape == (height, width, 3)


@st.composite
def images(draw, *, modes=FORMAT_MODES):
    """A small valid image file's bytes: random format, mode, size, content and EXIF orientation."""
    fmt, ext, mode = draw(st.sampled_from(modes))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode in ("I", "F"):
        img = Image.fromarray(rng.integers(-10, 70000, (height, width)).astype("int32" if mode == "I" else "float32"))
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        img = img.convert(mode)
    kwargs = {}
    orientation = draw(st.integers(0, 8))
    if orientation and fmt in EXIF_FORMATS:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return ext, buf.getvalue()


SIZES = st.tuples(st.integers(1, 48), st.integers(1, 48))


@FUZZ
@given(image=images(), size=SIZES)
def test_every_valid_small_image_loads_at_the_requested_size(folder, image, size):
    ext, data = image
    path = _write(folder, data, ext)
    pixels = load_pixels(path, height=size[0], width=size[1])  # a valid file must load, not just fail cleanly
    assert pixels.dtype == np.uint8 and pixels.shape == (*size, 3)


@FUZZ
@given(data=st.binary(max_size=2048), ext=st.sampled_from([ext for _, ext, _ in WRITERS] + [".jpeg", ".txt"]),
       size=SIZES)
def test_arbitrary_bytes_load_or_raise_image_error(folder, data, ext, size):
    _load(_write(folder, data, ext), *size)


@FUZZ
@given(image=images(), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), size=SIZES)
def test_damaged_image_files_load_or_raise_image_error(folder, image, edits, cut, size):
    """Valid files with a few bytes changed (headers, EXIF, pixel data) and perhaps truncated."""
    ext, data = image
    damaged = bytearray(data)
    for position, value in edits:
        damaged[position % len(damaged)] = value
    if cut is not None:
        damaged = damaged[: cut % (len(damaged) + 1)]
    _load(_write(folder, bytes(damaged), ext), *size)


@st.composite
def exif_blocks(draw) -> bytes:
    """A hand-built EXIF block: random tags (orientation, sizes, text, IFD pointers), random types,
    counts and values, in either byte order. Pillow parses it when asked for the orientation and
    writes it back after rotating: malformed entries raise struct.error, TypeError, ... there."""
    order = draw(st.sampled_from([">", "<"]))
    tags = st.one_of(st.sampled_from([0x0112, 0x0100, 0x0101, 0x010E, 0x011A, 0x0128, 0x8769, 0x8825, 0xA005]),
                     st.integers(0, 0xFFFF))
    entries = draw(st.lists(st.tuples(tags, st.integers(0, 13), st.integers(0, 6), st.binary(min_size=4, max_size=4)),
                            min_size=0, max_size=6))
    entries.insert(0, (0x0112, 3, 1, struct.pack(order + "HH", draw(st.integers(0, 9)), 0)))  # orientation
    block = struct.pack(order + "2sHIH", b"MM" if order == ">" else b"II", 42, 8, len(entries))
    block += b"".join(struct.pack(order + "HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    return b"Exif\x00\x00" + block + struct.pack(order + "I", 0) + draw(st.binary(max_size=32))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns while writing and opening such EXIF
@FUZZ
@given(exif=exif_blocks(), fmt=st.sampled_from([("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")]), size=SIZES)
def test_images_with_malformed_exif_load_or_raise_image_error(folder, exif, fmt, size):
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (200, 30, 10)).save(buf, format=fmt[0], exif=exif)
    path = _write(folder, buf.getvalue(), fmt[1])
    _load(path, *size)
    with Image.open(path) as img:  # the same image passed in as a PIL image (the device API)
        _load(img, *size)


PIL_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
             "I", "I;16", "I;16B", "I;16L", "I;16N", "F"]


@FUZZ
@given(mode=st.sampled_from(PIL_MODES), width=st.integers(1, 24), height=st.integers(1, 24),
       raw=st.binary(min_size=0, max_size=24 * 24 * 4), size=SIZES)
def test_pil_images_of_any_mode_load_or_raise_image_error(mode, width, height, raw, size):
    """PIL images passed in directly (the device API): any mode, any pixel values."""
    img = Image.new(mode, (width, height))
    needed = len(img.tobytes())
    img.frombytes((raw * (needed // max(len(raw), 1) + 1))[:needed] if raw else bytes(needed))
    _load(img, *size)


@FUZZ
@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=4), dtype=st.sampled_from(["uint8", "uint16", "float32",
                                                                                          "bool", "int8"]),
       size=SIZES)
def test_arrays_of_any_shape_load_or_raise_image_error(shape, dtype, size):
    _load(np.ones(shape, dtype=dtype), *size)


def test_the_fuzz_is_deterministic():
    """CI stability: the settings fix the examples (no database, derandomized, no deadline)."""
    assert FUZZ.derandomize and FUZZ.database is None and FUZZ.deadline is None and FUZZ.max_examples <= 200
    assert os.environ.get("HYPOTHESIS_PROFILE") in (None, "", "default")
