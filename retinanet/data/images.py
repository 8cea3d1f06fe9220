"""Image files: finding them, reading their size, decoding them into RGB tensors, and turning every way a file can
be unreadable (missing, a directory, undecodable, truncated, a decompression bomb) into a ValueError that names it.
transforms.py then resizes and flips them, the model normalises them.
"""

import contextlib
import os
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # what a folder scan picks


def require_file(path: str, what: str = "file") -> None:
    """Raise ValueError naming `path` unless it is an existing file (a directory is not)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: {what} expected, found a directory")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} not found")


@contextlib.contextmanager
def _image_errors_as_value_error(path: str, allow_large: bool = False) -> Iterator[None]:
    """Turn Pillow's errors for `path` into a ValueError naming the file; refuse decompression bombs (images past
    Pillow's MAX_IMAGE_PIXELS, about 89 million pixels) unless `allow_large`."""
    require_file(path, "image file")
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; an error refuses the file either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if allow_large:
                Image.MAX_IMAGE_PIXELS = None  # Pillow reads it when it opens a file: no limit for this one
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ValueError(
                f"{path}: image refused as a possible decompression bomb ({error}); if the file is trusted, read it "
                f"with allow_large=True (the scripts' --allow_large_images)"
            ) from error
        # SyntaxError: Pillow's PNG reader raises it for a corrupt chunk in the middle of a file.
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{path}: cannot decode image: {error}") from error
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def read_image_size(path: str, allow_large: bool = False) -> tuple[int, int]:
    """(height, width) of an image file, read from its header without decoding the pixels; past Pillow's pixel
    limit only with allow_large."""
    with _image_errors_as_value_error(path, allow_large), Image.open(path) as image:
        width, height = image.size
        return height, width


def read_rgb_image(path: str, allow_large: bool = False) -> torch.Tensor:
    """Decode an image file into a (3, H, W) uint8 RGB tensor, whatever the stored mode.

    Grayscale and palette images are expanded to RGB, alpha is dropped, and 16-bit images are scaled to 8 bits
    (65535 -> 255) instead of being saturated as Pillow's convert("RGB") would. Raises ValueError naming the file
    if it is missing, undecodable, truncated or, unless `allow_large` (a trusted orthophoto of 20,000 x 20,000
    pixels, say), larger than PIL.Image.MAX_IMAGE_PIXELS.
    """
    with _image_errors_as_value_error(path, allow_large), Image.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit gray ("I" holds it in older Pillow)
            gray = np.round(np.asarray(image, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8)
            array = np.repeat(gray[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
        else:
            array = np.asarray(image.convert("RGB"))  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def find_images(path: str, recursive: bool = False) -> list[str]:
    """[path] for an image file; for a folder, the image files (IMAGE_EXTENSIONS) in it, and with `recursive` also
    those in its subfolders, sorted by path."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such image file or folder")
    if recursive:
        candidates = [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names]
    else:
        candidates = [os.path.join(path, name) for name in os.listdir(path)]
    image_paths = sorted(file for file in candidates
                         if file.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(file))
    if not image_paths:
        where = "this folder or its subfolders" if recursive else "this folder"
        raise ValueError(f"{path}: no images found in {where} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return image_paths
