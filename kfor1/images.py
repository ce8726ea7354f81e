"""Image files to model inputs: decoding and the evaluation centre crop.

Kept free of JAX so that data loaders and the command line can use it without a device.
Decoding failures become one readable ``ImageReadError`` instead of a Pillow traceback.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from kfor1.errors import UserError

__all__ = ["ImageReadError", "center_crop_resize", "decode_bytes", "load_image", "read_images"]


class ImageReadError(UserError, ValueError):
    """A file exists but does not decode as an image."""


def _read_error(path: str, reason: object) -> ImageReadError:
    return ImageReadError(f"cannot read image {path}: {reason}; is it a JPEG/PNG?")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels; transparency is composited over white, as image viewers show it."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale (e.g. PNG): keep the top 8 bits rather than clipping at 255.
        wide = np.asarray(image, dtype=np.uint32) >> 8
        image = Image.fromarray(wide.astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file to a ``uint8`` array of shape (height, width, 3), RGB.

    Grayscale, palette and alpha images are converted; EXIF orientation (phone photos) is
    applied. Raises ``FileNotFoundError`` for a missing path and ``ImageReadError`` (a
    ``ValueError``) for a file that is not a decodable image.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such image file: {path}")
    if os.path.isdir(path):
        raise ImageReadError(f"cannot read image {path}: it is a directory")
    with open(path, "rb") as f:
        return decode_bytes(f.read(), path)


def decode_bytes(data: bytes, name: str = "image") -> np.ndarray:
    """Encoded bytes (JPEG, PNG, BMP, GIF, WebP...) to ``uint8`` (height, width, 3), RGB: kfor1's
    one decoding rule, used by training's input pipeline and by prediction alike (EXIF
    orientation applied; transparency composited over white). ``name`` goes in errors."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # Decode now, so truncated files fail here rather than later.
            image = ImageOps.exif_transpose(image) or image
            rgb = _to_rgb(image)
    # Pillow signals bad data with many types (UnidentifiedImageError is an OSError; broken
    # PNG chunks raise SyntaxError; short reads struct.error or EOFError).
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
            Image.DecompressionBombError) as exc:
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        reason = reason.replace(f" {name!r}", "").replace(name, "") or type(exc).__name__
        raise _read_error(name, reason) from None
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3 or 0 in array.shape:
        raise _read_error(name, f"decoded to an array of shape {array.shape}")
    return array


def center_crop_resize(image: np.ndarray, resolution: int, crop_fraction: float) -> np.ndarray:
    """The standard ImageNet evaluation crop, so inputs look like those the model was scored on.

    Resizes (bicubic) so the shorter side is ``resolution / crop_fraction``, then takes the
    central ``resolution`` x ``resolution`` square. Returns ``uint8`` (resolution, resolution, 3).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an (height, width, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    height, width = image.shape[:2]
    short = max(resolution, int(round(resolution / crop_fraction)))
    if height <= width:
        new_h, new_w = short, max(short, int(round(width * short / height)))
    else:
        new_h, new_w = max(short, int(round(height * short / width))), short
    if (new_h, new_w) != (height, width):
        resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
        image = np.asarray(resized)
    top = (new_h - resolution) // 2
    left = (new_w - resolution) // 2
    return np.ascontiguousarray(image[top : top + resolution, left : left + resolution])


def read_images(
    paths: Sequence[str], resolution: int | Sequence[int], crop_fraction: float | Sequence[float],
) -> tuple[list[np.ndarray | None], list[ImageReadError]]:
    """Each file decoded and centre-cropped to ``resolution`` (a ``uint8`` HWC array), or
    ``None`` where it cannot be decoded, with the errors of those files in order.

    ``resolution`` and ``crop_fraction`` may be one value or one per path (mixed tasks)."""
    sizes = [resolution] * len(paths) if isinstance(resolution, int) else list(resolution)
    crops = ([crop_fraction] * len(paths) if isinstance(crop_fraction, float | int)
             else list(crop_fraction))
    images: list[np.ndarray | None] = []
    errors: list[ImageReadError] = []
    for path, size, crop in zip(paths, sizes, crops):
        try:
            images.append(center_crop_resize(load_image(path), size, crop))
        except ImageReadError as e:
            images.append(None)
            errors.append(e)
    return images, errors
