import io

import numpy as np
import pytest
from conftest import make_class_folder
from PIL import Image

from featx_edge.data.folders import load_splits, scan_folder, split_folder
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
    from featx_edge.files.atomic import write_json

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


# --- hardening: malformed metadata, bit depth, hidden files, symlinks, class names ---------------


def _jpeg_with_malformed_exif(path):
    """A JPEG whose EXIF makes Pillow's ``exif_transpose`` raise ``struct.error``.

    The EXIF says "rotate" (so exif_transpose re-serializes it) and holds an ImageWidth tag
    (which must be an integer) whose value is text: packing it back fails.
    """
    import struct

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotated
    exif[0x010E] = "a description"  # ImageDescription, ASCII
    Image.new("RGB", (8, 6), (10, 200, 30)).save(path, format="JPEG", exif=exif.tobytes())
    data = bytearray(path.read_bytes())
    tiff = data.index(b"Exif\x00\x00") + 6
    order = ">" if data[tiff : tiff + 2] == b"MM" else "<"
    at = data.index(struct.pack(order + "HH", 0x010E, 2), tiff)
    data[at : at + 2] = struct.pack(order + "H", 0x0100)  # ImageWidth now holds text
    path.write_bytes(bytes(data))
    return path


def test_malformed_exif_is_an_image_error_naming_the_file(tmp_path):
    import struct

    from PIL import ImageOps

    path = _jpeg_with_malformed_exif(tmp_path / "bad_exif.jpg")
    with Image.open(path) as img, pytest.raises(struct.error):  # what Pillow itself does with it
        ImageOps.exif_transpose(img)
    with pytest.raises(ImageError, match=r"bad_exif\.jpg: malformed EXIF"):
        open_image(path)
    with pytest.raises(ImageError, match=r"bad_exif\.jpg: malformed EXIF"):
        load_pixels(path, height=4, width=4)
    with Image.open(path) as img, pytest.raises(ImageError, match=r"bad_exif\.jpg: malformed EXIF"):
        load_pixels(img, height=4, width=4)  # a PIL image passed directly


def test_scan_marks_a_malformed_exif_file_bad_and_goes_on(tmp_path):
    root = make_class_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    _jpeg_with_malformed_exif(root / "cat" / "bad_exif.jpg")
    folder = scan_folder(root)
    (bad,) = folder.skipped
    assert bad.path == "cat/bad_exif.jpg" and bad.reason.startswith("malformed EXIF")
    assert len(folder.files["cat"]) == 3


def test_sixteen_bit_images_are_scaled_by_bit_depth_not_content(tmp_path):
    dark = np.full((6, 8), 200, np.uint16)  # 200 of 65535: nearly black
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode.startswith("I;16")
    assert load_pixels(tmp_path / "dark16.png", height=6, width=8).max() <= 1
    twelve_bit = np.full((6, 8), 4095, np.uint16)  # a 12-bit sensor's white is 1/16 of the 16-bit range
    Image.fromarray(twelve_bit).save(tmp_path / "twelve.png")
    assert abs(int(load_pixels(tmp_path / "twelve.png", height=6, width=8).max()) - 16) <= 1
    as_int32 = Image.fromarray(np.array([[200, 65535, 70000, -5]], np.int32))  # mode I (older Pillow's 16-bit PNG)
    assert as_int32.mode == "I"
    assert load_pixels(as_int32, height=1, width=4)[0, :, 0].tolist() == [1, 255, 255, 0]


def test_float_images_use_pillows_0_to_255_scale():
    img = Image.fromarray(np.array([[0.0, 100.0, 1e9, -3.0]], np.float32))  # one very bright pixel
    assert img.mode == "F"
    assert load_pixels(img, height=1, width=4)[0, :, 0].tolist() == [0, 100, 255, 0]
    nan = Image.fromarray(np.array([[np.nan, 7.0]], np.float32))
    assert load_pixels(nan, height=1, width=2)[0, :, 0].tolist() == [0, 7]


def test_hidden_files_and_folders_are_ignored_everywhere(tmp_path):
    root = make_class_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    make_class_folder(root / "cat" / ".thumbnails", {"nested": 2})  # a hidden folder inside a class
    make_class_folder(root, {".trash": 3})  # a hidden class folder
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "dog" / "._000.png").write_bytes(b"AppleDouble resource fork")
    (root / "dog" / "sub").mkdir()
    (root / "dog" / "sub" / ".hidden.png").write_bytes((root / "dog" / "000.png").read_bytes())
    folder = scan_folder(root)
    assert folder.classes == ("cat", "dog") and folder.skipped == ()
    assert folder.files == {"cat": tuple(f"cat/{i:03d}.png" for i in range(3)),
                            "dog": tuple(f"dog/{i:03d}.png" for i in range(3))}


def test_symlinks_leaving_the_folder_or_looping_are_skipped_with_a_reason(tmp_path):
    root = make_class_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    outside = make_class_folder(tmp_path / "elsewhere", {"x": 3})
    (root / "cat" / "escape.png").symlink_to(outside / "x" / "000.png")
    (root / "cat" / "escape_dir").symlink_to(outside / "x", target_is_directory=True)
    (root / "bird").symlink_to(outside / "x", target_is_directory=True)  # a class folder outside
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    (root / "dog" / "up").symlink_to(root, target_is_directory=True)
    (root / "dog" / "broken.png").symlink_to(tmp_path / "gone.png")
    (root / "dog" / "alias.png").symlink_to(root / "dog" / "000.png")  # inside the folder: fine
    folder = scan_folder(root)
    reasons = {s.path: s.reason for s in folder.skipped}
    assert set(reasons) == {"cat/escape.png", "cat/escape_dir", "bird", "cat/loop", "dog/up", "dog/broken.png"}
    for rel in ("cat/escape.png", "cat/escape_dir", "bird"):
        assert f"outside the folder `{root}`" in reasons[rel] and "not followed" in reasons[rel]
    assert "loop" in reasons["cat/loop"] and "loop" in reasons["dog/up"]
    assert "broken symlink" in reasons["dog/broken.png"]
    assert folder.classes == ("cat", "dog")
    assert "dog/alias.png" in folder.files["dog"] and len(folder.files["cat"]) == 3


@pytest.mark.parametrize("name", ["\x1b[31mred", "tab\there", "bell\x07", "line\nbreak", "del\x7f", "rtl\u202eoverride"])
def test_class_folder_names_with_control_characters_are_refused(tmp_path, name):
    root = make_class_folder(tmp_path / "data", {"cat": 3, name: 3})
    with pytest.raises(DataError) as err:
        scan_folder(root)
    message = str(err.value)
    assert repr(name) in message and "rename the folder" in message.lower()
    assert name not in message  # the raw characters never reach a terminal


def test_links_that_point_at_each_other_end(tmp_path):
    root = make_class_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    (root / "cat" / "a").symlink_to(root / "cat" / "b")
    (root / "cat" / "b").symlink_to(root / "cat" / "a")  # a -> b -> a: no target at all
    (root / "cat" / "sub").mkdir()
    (root / "cat" / "sub" / "to_dog").symlink_to(root / "dog", target_is_directory=True)
    (root / "dog" / "to_cat_sub").symlink_to(root / "cat" / "sub", target_is_directory=True)  # a cycle via two links
    folder = scan_folder(root)
    reasons = {s.path: s.reason for s in folder.skipped}
    assert "loop" in reasons["cat/a"] and "loop" in reasons["cat/b"]
    assert "loop" in reasons["cat/sub/to_dog/to_cat_sub"] and "loop" in reasons["dog/to_cat_sub/to_dog"]
