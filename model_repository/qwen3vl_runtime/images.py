"""Decode client image bytes safely: known formats only, a pixel cap against decompression bombs,
and errors that say what is wrong with which image."""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings

from PIL import Image, UnidentifiedImageError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
# Leading bytes of the accepted formats; anything else is tried as base64 text (JSON transports).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")
_DATA_URL = re.compile(rb"^data:image/[a-zA-Z0-9.+-]+;base64,")


class ImageError(ValueError):
    """A client image that cannot be used; the message names the image and the problem."""


def _raw_bytes(data: bytes, index: int) -> bytes:
    if data.startswith(_MAGIC):
        return data
    text = _DATA_URL.sub(b"", data.strip(), count=1)
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return data  # not base64 either: let the decoder name the problem
    if not decoded:
        raise ImageError(f"image {index}: empty")
    return decoded


def decode_image(data: bytes, index: int, *, max_source_pixels: int) -> Image.Image:
    """Encoded bytes (or their base64 text) -> an RGB image, or ImageError."""
    if not data:
        raise ImageError(f"image {index}: empty (0 bytes)")
    data = _raw_bytes(data, index)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        if _png_declares_no_pixels(data):
            raise ImageError(f"image {index}: has no pixels (0 width or height)") from None
        raise ImageError(f"image {index}: not a PNG, JPEG or WebP image (unknown or corrupt data)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image {index}: too many pixels (decompression bomb guard)") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ImageError(f"image {index}: format {image.format} is not supported; send PNG, JPEG or WebP")
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"image {index}: has no pixels ({width}x{height})")
    if width * height > max_source_pixels:
        raise ImageError(
            f"image {index}: {width}x{height} is {width * height:,} pixels, over this server's limit of "
            f"{max_source_pixels:,} for a source image (decompression bomb guard)"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {index}: corrupt or truncated {image.format} data ({exc})") from None
    return image.convert("RGB")


def _png_declares_no_pixels(data: bytes) -> bool:
    """PIL refuses a 0x0 PNG as unidentifiable; read its header to say what is really wrong."""
    if not data.startswith(_MAGIC[0]) or data[12:16] != b"IHDR" or len(data) < 24:
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width == 0 or height == 0
