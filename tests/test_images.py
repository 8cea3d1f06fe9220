import numpy as np
import pytest
import torch
from conftest import CLASSES, save_image, write
from PIL import Image

from retinanet.dataloader import CSVDataset, read_image_size, read_rgb_image


def test_images_of_every_mode_are_read_as_rgb(tmp_path):
    gray = np.array([[0, 128, 255]], dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "l.png")
    Image.fromarray(np.stack([gray, gray], axis=2), mode="LA").save(tmp_path / "la.png")
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 128], [70, 80, 90, 255]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    palette = Image.fromarray(np.array([[0, 1, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.save(tmp_path / "p.png")
    sixteen = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)  # 8-bit 0, 100, 255
    Image.fromarray(sixteen).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as stored:
        assert stored.mode == "I;16"

    expected = {
        "l.png": [[0, 128, 255]] * 3,
        "la.png": [[0, 128, 255]] * 3,
        "rgba.png": [[10, 40, 70], [20, 50, 80], [30, 60, 90]],
        "p.png": [[255, 0, 0], [0, 0, 0], [0, 255, 255]],
        "i16.png": [[0, 100, 255]] * 3,
    }
    for name, channels in expected.items():
        image = read_rgb_image(str(tmp_path / name))
        assert image.dtype == torch.uint8 and image.shape == (3, 1, 3), name
        torch.testing.assert_close(image[:, 0, :], torch.tensor(channels, dtype=torch.uint8), msg=name)


def broken_png(tmp_path):
    """A PNG whose second IDAT chunk has a garbled chunk type: Pillow raises SyntaxError while decoding."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    data = bytearray((tmp_path / "noise.png").read_bytes())
    second_idat = data.find(b"IDAT", data.find(b"IDAT") + 4)
    data[second_idat : second_idat + 4] = b"\x00\x01\x02\x03"
    return bytes(data)


def truncated(tmp_path, suffix):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    return data[: len(data) // 2]


BAD_FILES = {
    "zero.png": lambda tmp_path: b"",
    "text.jpg": lambda tmp_path: b"this is not an image\n",
    "truncated.png": lambda tmp_path: truncated(tmp_path, ".png"),
    "truncated.jpg": lambda tmp_path: truncated(tmp_path, ".jpg"),
    "broken_chunk.png": broken_png,
}


def test_the_size_from_the_header_is_height_then_width_as_the_decoded_image(tmp_path):
    path = str(tmp_path / "wide.png")
    Image.new("RGB", (40, 30)).save(path)  # PIL sizes are (width, height)
    assert read_image_size(path) == (30, 40) == tuple(read_rgb_image(path).shape[1:])


@pytest.mark.parametrize("name", BAD_FILES)
def test_undecodable_images_raise_value_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name](tmp_path))
    with pytest.raises(ValueError, match="cannot decode image") as error:
        read_rgb_image(str(path))
    assert str(path) in str(error.value)


def test_broken_image_is_named_when_the_dataset_is_made(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    classes = write(tmp_path / "classes.csv", CLASSES)
    annotations = write(tmp_path / "train.csv", "a.png,1,2,3,4,cat\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'a.png'}: cannot decode image"):
        CSVDataset(str(annotations), str(classes))  # its size is read from its header then, not hours into training


def test_missing_image_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'gone.png'}: image file not found"):
        read_rgb_image(str(tmp_path / "gone.png"))


@pytest.mark.parametrize("side", [12, 20])  # 144 pixels: Pillow would only warn; 400 > 2 * 100: Pillow's error
def test_decompression_bombs_are_refused(tmp_path, monkeypatch, side):
    path = save_image(tmp_path / "big.png", side, side)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="decompression bomb") as error:
        read_rgb_image(str(path))
    assert str(path) in str(error.value) and "--allow_large_images" in str(error.value)


def test_images_past_the_pixel_limit_are_read_where_asked_and_the_limit_stays(tmp_path, monkeypatch):
    path = save_image(tmp_path / "big.png", 30, 20, color=(10, 20, 30))  # 600 pixels > 2 * 100
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert read_image_size(str(path), allow_large=True) == (20, 30)
    image = read_rgb_image(str(path), allow_large=True)
    assert image.shape == (3, 20, 30) and image[:, 0, 0].tolist() == [10, 20, 30]
    assert Image.MAX_IMAGE_PIXELS == 100  # restored: the next file is checked again
    with pytest.raises(ValueError, match="decompression bomb"):
        read_image_size(str(path))
