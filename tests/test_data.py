import io

import numpy as np
import pytest
from conftest import make_class_folder
from PIL import Image

from featx_edge.data import load_splits, scan_folder, split_folder
from featx_edge.errors import DataError, ImageError
from featx_edge.runtime.image import load_pixels, open_image


def _png_bytes(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_files_are_skipped_and_listed(tmp_path):
    root = make_class_folder(tmp_path / "data", {"cat": 5, "dog": 5})
    good = (root / "cat" / "000.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "fake.jpg").write_bytes(b"this is text pretending to be a jpeg")
    folder = scan_folder(root)
    skipped = {s.path: s.reason for s in folder.skipped}
    assert set(skipped) == {"cat/truncated.png", "cat/notes.txt", "dog/fake.jpg"}
    assert "truncated" in skipped["cat/truncated.png"]
    assert "not an image" in skipped["cat/notes.txt"]
    assert folder.files["cat"] == tuple(f"cat/{i:03d}.png" for i in range(5))


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    root = make_class_folder(tmp_path / "data", {"a": 3, "b": 3}, size=16)
    Image.new("L", (400, 400)).save(root / "a" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    folder = scan_folder(root)
    (bomb,) = folder.skipped
    assert bomb.path == "a/bomb.png" and "decompression bomb" in bomb.reason


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    ext = "tiff" if mode == "CMYK" else "png"
    path = tmp_path / f"img.{ext}"
    img.save(path)
    pixels = load_pixels(path, height=10, width=12)
    assert pixels.shape == (10, 12, 3) and pixels.dtype == np.uint8
    if mode == "I;16":  # 16-bit scaled to 8 bits, not clipped to white
        full = load_pixels(path, height=20, width=30)
        np.testing.assert_allclose(full[:, :, 0], rgb[:, :, 0], atol=1)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP"])
def test_supported_file_formats(tmp_path, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path, format=fmt)
    assert open_image(path).mode == "RGB"


def test_rgba_transparency_composites_on_white():
    arr = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    assert (load_pixels(arr, height=4, width=4) == 255).all()


def test_fewer_than_two_classes_is_an_error(tmp_path):
    root = make_class_folder(tmp_path / "data", {"only": 5})
    (tmp_path / "data" / "empty").mkdir()
    with pytest.raises(DataError, match="1 class\\(es\\) with usable images.*empty: 0, only: 5"):
        scan_folder(root)


def test_tiny_class_is_named_with_its_count(tmp_path):
    root = make_class_folder(tmp_path / "data", {"big": 6, "small": 2})
    with pytest.raises(DataError, match="`small` has 2"):
        scan_folder(root)


def test_missing_folder_and_flat_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        scan_folder(tmp_path / "flat")


def test_split_is_seeded_stratified_disjoint_and_persisted(tmp_path):
    from featx_edge.rundir import write_json

    root = make_class_folder(tmp_path / "data", {"a": 20, "b": 10, "c": 7})
    folder = scan_folder(root)
    s1 = split_folder(folder, val_fraction=0.2, test_fraction=0.2, seed=3)
    s2 = split_folder(folder, val_fraction=0.2, test_fraction=0.2, seed=3)
    s3 = split_folder(folder, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert s1 == s2 and s1.test != s3.test
    sets = [set(s1.train), set(s1.val), set(s1.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len(s1.train) + len(s1.val) + len(s1.test) == 37
    test_counts = {c: sum(p.startswith(c + "/") for p in s1.test) for c in "abc"}
    assert test_counts == {"a": 4, "b": 2, "c": 1}
    write_json(tmp_path / "splits.json", s1.to_json())
    assert load_splits(tmp_path / "splits.json") == s1


def test_unreadable_array_inputs():
    with pytest.raises(ImageError, match="uint8"):
        load_pixels(np.zeros((4, 4, 3), np.float32), height=2, width=2)
    with pytest.raises(ImageError, match="shape"):
        load_pixels(np.zeros((4, 4, 5), np.uint8), height=2, width=2)
