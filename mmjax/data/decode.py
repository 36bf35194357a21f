"""Untrusted image bytes -> RGB uint8, or a skip with its reason; resizing and cropping.

`decode` never raises on bad input: truncated or corrupt files, empty files, non-images,
formats outside `FORMATS` and decompression bombs come back as `Decoded(None, reason)`, with
`reason` one of a few short categories so that skips can be counted by kind. What can be
converted is: CMYK (through its ICC profile when it has one), grayscale, 16-bit (scaled to
8 bits, not clamped), palette and alpha images (composited onto white), EXIF orientation.

Pillow's pixel limit is process state: `set_limits` sets it (and makes Pillow's bomb warning an
error), and every source calls it when it is built and when it is unpickled, so each grain worker
process has it too.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps

# Formats Pillow may open (EPS, for one, would run Ghostscript on untrusted input); JPEG includes MPO.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 1 << 26  # 8192 x 8192
CROPS = ("center_crop", "random_crop", "resize")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": Pillow's mode for some 16-bit files
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@dataclasses.dataclass(frozen=True)
class Decoded:
    """An RGB uint8 [H, W, 3] image, or None and why (`reason`: a short category)."""

    image: np.ndarray | None
    reason: str = ""


def set_limits(max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Images above `max_pixels` pixels are decompression bombs: `decode` skips them (this process)."""
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow warns up to 2x the limit


def decode(data: bytes, target: int | None = None) -> Decoded:
    """Decodes `data` to RGB; `target` (the side the image will be resized to) lets large JPEGs
    decode at a reduced scale (Pillow's `draft`: 1/2, 1/4 or 1/8, both sides staying >= target)."""
    if not data:
        return Decoded(None, "empty file")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:  # Pillow only warned (its filter was reset)
                return Decoded(None, "decompression bomb")
            if target:
                im.draft("RGB", (target, target))  # a no-op except for JPEG
            im.load()
            return Decoded(_to_rgb(_exif_transpose(im)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Decoded(None, "decompression bomb")
    except Image.UnidentifiedImageError:
        return Decoded(None, "not an image")
    except (OSError, SyntaxError, EOFError):
        return Decoded(None, "truncated or corrupt")
    except Exception as e:  # anything else a hostile file triggers is a skip too
        return Decoded(None, f"undecodable ({type(e).__name__})")


def _exif_transpose(im: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception:  # malformed EXIF: keep the pixels as stored
        pass
    return im


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in _SIXTEEN_BIT:
        v = np.clip(np.asarray(im, np.int64), 0, 65535)
        gray = ((v * 255 + 32767) // 65535).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
        return np.repeat(gray[..., None], 3, axis=-1)
    if im.mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(im))
    if im.mode in _ALPHA or "transparency" in im.info:  # palette or colour-key transparency too
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, im.convert("RGBA")).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, profile, _SRGB, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):  # a broken profile: the naive conversion
            pass
    return im.convert("RGB")


def resize_crop(
    image: np.ndarray,
    size: int,
    mode: str = "center_crop",
    rng: np.random.Generator | None = None,
    flip: bool = False,
) -> np.ndarray:
    """`image` (uint8 [H, W, 3]) as [size, size, 3]: `center_crop` and `random_crop` take the
    largest square (centred, or at a position drawn from `rng`) and resize it; `resize` squashes
    the whole image. `flip` mirrors it horizontally with probability 1/2 (drawn from `rng`)."""
    if mode not in CROPS:
        raise ValueError(f"crop mode {mode!r}; choose {', '.join(CROPS)}")
    if (mode == "random_crop" or flip) and rng is None:
        raise ValueError(f"crop mode {mode!r} with flip={flip} draws from an rng; pass one")
    h, w = image.shape[:2]
    s = min(h, w)
    if mode == "center_crop":
        x0, y0 = (w - s) / 2, (h - s) / 2
    elif mode == "random_crop":
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    box = (0, 0, w, h) if mode == "resize" else (x0, y0, x0 + s, y0 + s)
    out = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC, box=box)
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)
