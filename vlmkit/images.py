"""Loading and checking input images: every failure is one clear :class:`InputError`."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vlmkit.errors import InputError

#: the largest image (in pixels) vlmkit decodes; larger ones are refused before decoding (decompression bombs)
MAX_PIXELS = 64_000_000

ImageLike = Image.Image | str | os.PathLike | bytes


def load_image(image: ImageLike, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open ``image`` (PIL image, path or encoded bytes) as an RGB PIL image.

    Grey, palette, RGBA and 16-bit images are converted to RGB. Corrupt, truncated, empty and oversized files raise
    :class:`InputError` naming the problem.
    """
    if isinstance(image, Image.Image):
        return _check_size(to_rgb(image), "image", max_pixels)
    if isinstance(image, bytes):
        name, source = "image bytes", io.BytesIO(image)
        if not image:
            raise InputError("image bytes are empty (0 bytes)")
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        name, source = f"image {path.name!r}", path
        if not path.is_file():
            raise InputError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise InputError(f"{name} is empty (0 bytes)")
    else:
        raise InputError(f"expected a PIL image, a path or bytes, got {type(image).__name__}")
    try:
        with Image.open(source) as opened:
            _check_size(opened, name, max_pixels)
            opened.load()
            return to_rgb(opened)
    except InputError:
        raise
    except Image.DecompressionBombError as error:
        raise InputError(f"{name} is too large to decode safely ({error}); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{name} is corrupt or truncated and cannot be decoded ({error})") from None


def _check_size(image: Image.Image, name: str, max_pixels: int) -> Image.Image:
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"{name} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"{name} is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,}; "
            "downscale it first"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit grey is rescaled, alpha is composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        return Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
