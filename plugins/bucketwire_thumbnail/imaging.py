"""The pure image path: bytes in, thumbnails out. No S3, no bucketwire context.

Kept separate from the hooks so a benchmark (or another program) can call exactly the code the plugin runs.

Why it is fast: a JPEG (or MPO, a JPEG with more pictures after it) is asked for with `Image.draft()`, which
makes libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT scaling), so a 12 MP photo headed for a 256 px thumbnail
is decoded at 500x375, not 4000x3000.
We draft to the smallest scale that still covers the largest target (1x, not Pillow's usual 2x: a 1/8 DCT
decode is an 8x8 block average, a clean box pre-filter), then resample with LANCZOS at the output size. Against
a full decode + LANCZOS that is ~44 dB PSNR, far below what the encoder itself loses (WebP q80: ~31 dB), and for
a 1024 px thumbnail of a 12 MP photo it means a 1/2-scale decode instead of a full one (`bench thumbnail`).
Other formats are decoded once and shrunk with `resize(..., reducing_gap=...)`, which
does a cheap box `reduce()` first and LANCZOS last. Every size is made from one decode, largest first, each
from the previous (still >= its target), so the later sizes cost almost nothing.

Why it is safe: the pixel count is checked from the header before any pixel is decoded (decompression bombs),
and every decoder failure (corrupt, truncated, unsupported) becomes `ThumbnailError`, which the plugin turns
into `bucketwire.PermanentError`, so a bad upload dead-letters instead of crashing or retrying forever.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from PIL import Image, UnidentifiedImageError

FORMATS: dict[str, tuple[str, str, str]] = {
    # setting value -> (Pillow format, content type, file extension)
    "webp": ("WEBP", "image/webp", "webp"),
    "jpeg": ("JPEG", "image/jpeg", "jpg"),
    "jpg": ("JPEG", "image/jpeg", "jpg"),
    "png": ("PNG", "image/png", "png"),
}
ALPHA_FORMATS = {"WEBP", "PNG"}

INPUT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "AVIF")
"""Pillow decoders offered an upload (JPEG includes MPO, what many phones write). Uploads are untrusted input:
Pillow's EPS plugin hands the file to Ghostscript when it is installed, and the rarely used decoders (FITS,
PCD, PSD, SGI, ...) are where decoder bugs are found; an object in any other format is refused by name."""

# Magic numbers of the formats we expect most; anything else is still offered to Pillow when the content type
# says image/*.
MAGIC: tuple[tuple[bytes, int], ...] = (
    (b"\xff\xd8\xff", 0),  # JPEG
    (b"\x89PNG\r\n\x1a\n", 0),
    (b"GIF87a", 0),
    (b"GIF89a", 0),
    (b"II*\x00", 0),  # TIFF little-endian
    (b"MM\x00*", 0),  # TIFF big-endian
    (b"BM", 0),
    (b"WEBP", 8),  # RIFF....WEBP
)

# The table ImageOps.exif_transpose uses, applied to each (small) output rather than to the decoded source:
# rotating a 256 px thumbnail is cheaper than rotating a 12 MP decode, and the longest edge is the same
# either way.
_ORIENTATION = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


class ThumbnailError(Exception):
    """The input cannot be made into thumbnails and never will be (corrupt, truncated, too large)."""


@dataclass(frozen=True, slots=True)
class Thumb:
    """One rendered thumbnail. Iterates as the documented tuple `(size, data, width, height)`."""

    size: int
    data: bytes
    width: int
    height: int

    def __iter__(self) -> Iterator[int | bytes]:  # tuple-unpacking convenience
        return iter((self.size, self.data, self.width, self.height))


def looks_like_image(head: bytes) -> bool:
    """True when the first bytes carry a known image signature (used when the content type is missing)."""
    return any(head[off : off + len(m)] == m for m, off in MAGIC)


def fit(width: int, height: int, size: int) -> tuple[int, int]:
    """Dimensions with the longest edge `size`, aspect kept, never upscaled, never 0."""
    longest = max(width, height)
    if longest <= size:
        return width, height
    scale = size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_output_mode(im: Image.Image, pil_format: str, background: tuple[int, int, int]) -> Image.Image:
    """Bring any decoded mode to RGB/RGBA (or L) the encoder accepts, keeping transparency where it can."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        im = im.convert("I") if mode != "I" else im
        lo, hi = cast(tuple[float, float], im.getextrema())  # one band: (min, max)
        span = 65535 if hi <= 65535 and lo >= 0 else max(1, hi - lo)
        offset = 0 if span == 65535 else lo
        im = im.point(lambda v: (v - offset) * (255.0 / span)).convert("L")
        mode = "L"
    elif mode in ("F", "1"):
        im = im.convert("L")
        mode = "L"
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info) or (
        mode in ("L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        im = im.convert("RGBA")
        if pil_format in ALPHA_FORMATS:
            return im
        flat = Image.new("RGB", im.size, background)
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    if mode == "L":
        return im
    if mode != "RGB":
        # CMYK (Pillow already undoes Adobe's inverted CMYK), P, YCbCr, LAB, HSV, RGBX ...
        im = im.convert("RGB")
    return im


def render(
    data: bytes,
    sizes: list[int] | tuple[int, ...],
    *,
    format: str = "webp",  # noqa: A002 - the natural name for the setting
    quality: int = 80,
    max_pixels: int = 100_000_000,
    background: tuple[int, int, int] = (255, 255, 255),
    input_formats: tuple[str, ...] | list[str] = INPUT_FORMATS,
) -> list[Thumb]:
    """Decode `data` once and return one thumbnail per size (longest edge), in the order of `sizes`.

    Raises `ThumbnailError` for anything that is not a decodable image in one of `input_formats` (Pillow format
    names) within `max_pixels`.
    """
    if not sizes:
        return []
    try:
        pil_format, _ctype, _ext = FORMATS[format]
    except KeyError:
        raise ValueError(f"unknown output format {format!r}; use one of {sorted(FORMATS)}") from None
    im = _open(data, max_pixels, tuple(input_formats))
    w, h = im.size
    order = sorted(set(sizes), reverse=True)
    base = _decode(im, fit(w, h, order[0]), max_pixels, pil_format, background)
    # Read after decoding: Pillow turns TIFFs upright itself while loading them (and drops the tag then; their
    # header size is already the upright one), so a tag read before the load turned those thumbnails over twice.
    try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not cost us the thumbnail
        orientation = 1

    # Fit against the *original* dimensions so a drafted decode does not change the output size.
    rendered: dict[int, tuple[bytes, int, int]] = {}
    src = base
    for size in order:
        out_w, out_h = fit(w, h, size)
        if src.size != (out_w, out_h):
            src = src.resize((out_w, out_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = src
        for op in _ORIENTATION.get(orientation, ()):
            out = out.transpose(op)
        rendered[size] = (_encode(out, pil_format, format, quality), out.width, out.height)
    return [Thumb(s, *rendered[s]) for s in sizes]


def _open(data: bytes, max_pixels: int, input_formats: tuple[str, ...]) -> Image.Image:
    """Read the header only, and refuse what is not an image, not an allowed format or too large before anything
    is decoded."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below is the limit; silence Pillow's global warning about it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=input_formats)
    except Image.DecompressionBombError as e:
        raise ThumbnailError(
            f"image rejected as a decompression bomb: over max_pixels={max_pixels} (Pillow: {e})"
        ) from None
    except UnidentifiedImageError:
        other = _identify(data)
        if other is not None:
            raise ThumbnailError(
                f"{other} image: not one of the input formats {', '.join(input_formats)} (input_formats setting)"
            ) from None
        raise ThumbnailError("not an image Pillow can decode (unknown or corrupt header)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ThumbnailError(f"cannot read image header: {e}") from None

    w, h = im.size
    if w <= 0 or h <= 0:
        raise ThumbnailError(f"image has invalid dimensions {w}x{h}")
    if w * h > max_pixels:
        raise ThumbnailError(
            f"image is {w}x{h} = {w * h} pixels, over max_pixels={max_pixels}; rejected as a possible "
            "decompression bomb (raise max_pixels if such images are expected)"
        )
    return im


def _identify(data: bytes) -> str | None:
    """The name of the format of a refused upload, from the header checks of every Pillow plugin that does not
    decode while opening: for the one-line reason only, never used to decode."""
    Image.init()
    head = data[:16]
    for name, (_factory, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head):
                return name
        except Exception:  # a plugin's check choking on a short header says nothing
            continue
    return None


def _decode(im: Image.Image, largest: tuple[int, int], max_pixels: int, pil_format: str,
            background: tuple[int, int, int]) -> Image.Image:
    """Decode the first frame, no larger than needed for `largest`, in a mode the encoder accepts; a truncated
    or broken file is a ThumbnailError (permanent), not a crash."""
    try:
        if im.format in ("JPEG", "MPO"):  # MPO: a JPEG with more pictures after it (phones)
            # DCT scaling: decode at the smallest 1/2^n scale still >= the largest target; LANCZOS does the rest.
            im.draft(im.mode if im.mode in ("RGB", "L") else None, largest)
        im.seek(0)  # GIF/APNG/TIFF: the first frame
        im.load()
        return _to_output_mode(im, pil_format, background)
    except ThumbnailError:
        raise
    except Image.DecompressionBombError as e:
        raise ThumbnailError(
            f"image rejected as a decompression bomb: over max_pixels={max_pixels} (Pillow: {e})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        # "image file is truncated", "broken data stream", unsupported compressions ...
        raise ThumbnailError(f"cannot decode image ({im.format or 'unknown format'}): {e}") from None


def _encode(out: Image.Image, pil_format: str, format: str, quality: int) -> bytes:  # noqa: A002
    save_kw: dict[str, object] = {}
    if pil_format == "JPEG":
        save_kw = {"quality": quality, "optimize": False}
    elif pil_format == "WEBP":
        # method 2, not libwebp's default 4: half the encode time (2 vs 4 ms at 256 px, ~8% of a
        # thumbnail), ~3% more bytes, same PSNR at the same quality (`bench thumbnail` reports both).
        save_kw = {"quality": quality, "method": 2}
    elif pil_format == "PNG":
        save_kw = {"compress_level": 6}
    buf = io.BytesIO()
    try:
        out.save(buf, pil_format, **save_kw)
    except (OSError, ValueError) as e:
        raise ThumbnailError(f"cannot encode {format} thumbnail: {e}") from None
    return buf.getvalue()


def content_type(format: str) -> str:  # noqa: A002
    """The MIME type of thumbnails written in `format`."""
    return FORMATS[format][1]


def extension(format: str) -> str:  # noqa: A002
    """The usual file extension of `format` (without dot)."""
    return FORMATS[format][2]


__all__ = [
    "FORMATS", "Thumb", "ThumbnailError", "content_type", "extension", "fit", "looks_like_image", "render",
]
