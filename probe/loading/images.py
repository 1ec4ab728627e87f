"""How an image folder's files are read: what torchvision's ImageFolder does (`convert("RGB")`),
except where that silently changes the pixels (16-bit grey clipped at 255, 32-bit or float
pixels clipped to 0..255) or raises a traceback without naming the file (truncated, not an
image, too large to decode safely). `read_image` is `probe.loading.datasets`' loader."""

from __future__ import annotations

import contextlib

import numpy as np
from PIL import Image

from probe.errors import ProbeError

__all__ = ["check_range", "read_image", "readable"]


# PIL's modes of 16-bit grey pixels (PNG, TIFF); PGM files of more than 8 bits open as "I", scaled to 0..65535.
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str) -> Image.Image:
    """An image folder's file as an 8-bit RGB image, as torchvision's ImageFolder reads it
    (`img.convert("RGB")`), except where that would silently change the pixels or raise a
    traceback: 16-bit grey pixels are scaled to 8 bits (value / 257) instead of clipped at 255,
    pixels of no known range (32-bit integers or floats, mode "I" or "F") and files PIL cannot
    decode (truncated, not an image, too large) are a ProbeError naming the file."""
    with readable(path), open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
        return _eight_bit(image, path).convert("RGB")


def check_range(image: Image.Image, path: str) -> None:
    """ProbeError for an image whose pixels have no known range (mode "F", or "I" outside PGM/PPM)."""
    if image.mode == "F" or (image.mode == "I" and image.format != "PPM"):
        kind = "floating-point" if image.mode == "F" else "32-bit integer"
        raise ProbeError(
            f"imagefolder file {path!r} holds {kind} pixels (mode {image.mode}), whose range probe cannot know "
            "(it reads 8- and 16-bit images); save it as an 8- or 16-bit PNG, or remove it."
        )


def _eight_bit(image: Image.Image, path: str) -> Image.Image:
    """`image` with 8-bit channels: 16-bit grey scaled (0..65535 -> 0..255), others as they are."""
    check_range(image, path)
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)  # (h, w), 0..65535
        return Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8))  # mode "L"
    return image


@contextlib.contextmanager
def readable(path: str):
    """PIL's errors for a file it cannot read, as a ProbeError naming the file."""
    try:
        yield
    except Image.DecompressionBombError as err:
        raise ProbeError(
            f"imagefolder file {path!r} is too large to decode safely ({err}); shrink or remove it."
        ) from err
    except OSError as err:  # PIL's UnidentifiedImageError is one, and "image file is truncated"
        raise ProbeError(
            f"imagefolder file {path!r} is no image PIL can read ({err}); remove or replace it."
        ) from err
