"""The one image reader: a file (or a PIL image) → (H, W, 3) uint8 RGB, for every place that reads
images given by a user — your own folder (``folder.py``), CelebA (``celeba.py``), ``fastdmtg
predict`` / ``model.predict`` (``predict.py``). Taskonomy's PNGs have their own checked decoder
(``taskonomy.load_domain``: its rgb must be an 8-bit RGB PNG, its 16-bit maps are targets).

Pixel depth (Pillow's mode after opening the file):
    8-bit modes (1, L, P, RGB, RGBA, LA, CMYK, YCbCr, ...)   Pillow's ``convert("RGB")`` (alpha dropped)
    16-bit grayscale (I;16, I;16B, I;16L, and mode I from a
      16-bit PNG)                                            the top 8 bits of each value (v >> 8:
                                                             32768 → 128, 65535 → 255), the same
                                                             reduction Pillow applies to 48-bit RGB PNGs,
                                                             so a 16-bit gray and a 48-bit RGB copy of
                                                             one picture give the same pixels
    32-bit integer (I) or float (F)                          refused: the file does not say which range
                                                             its values span (0..1, 0..255, 0..65535,
                                                             physical units), so any 8-bit mapping
                                                             would be a guess; the error says to save
                                                             it as an 8- or 16-bit image
Before that, clipping to 8 bits turned every 16-bit / 32-bit image solid white.

Size: an image of more pixels than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``,
89,478,485 by default, e.g. 9459 × 9459) is refused from its header, before decoding.

Every failure raises ``ImageReadError`` (a ValueError) whose one-line message starts with the path.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

#: modes holding 16-bit unsigned gray values (Pillow spells the byte order in the name)
MODES_16 = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageReadError(ValueError):
    """An image that is missing, unreadable, too large or of an unsupported pixel type; ``str`` is
    one line starting with the path. ``missing``: the file does not exist."""

    def __init__(self, message: str, missing: bool = False):
        super().__init__(message)
        self.missing = missing


def _pixel_limit() -> int | None:
    from PIL import Image
    return Image.MAX_IMAGE_PIXELS


def to_rgb8(im, name: str = "image") -> np.ndarray:
    """A loaded PIL image → (H, W, 3) uint8 (module doc: 16-bit values reduced to their top 8 bits,
    32-bit refused). ``name`` names it in errors."""
    mode = im.mode
    if mode in MODES_16 or (mode == "I" and _is_16bit_png(im)):
        v = np.asarray(im).astype(np.uint32)                                    # (H, W), 0..65535
        g = (v >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))      # (H, W, 3)
    if mode in ("I", "F") or mode.startswith("I;"):
        kind = "float" if mode == "F" else "integer"
        raise ImageReadError(f"{name}: {kind} pixels (Pillow mode {mode}) have no defined 8-bit range; "
                             "save it as an 8-bit or 16-bit image")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _is_16bit_png(im) -> bool:
    """Older Pillow opens 16-bit grayscale PNGs as mode I: their values are 0..65535."""
    return getattr(im, "format", None) == "PNG"


def high_bit_depth(buf) -> str | None:
    """From an encoded file's header (bytes or a uint8 array): "16-bit PNG" etc. when its samples have
    more than 8 bits, else None. For decoders other than ``read_rgb`` (DALI rounds 16 → 8 bits its own
    way, v * 255 / 65535, where ``read_rgb`` keeps the top 8 bits): they refuse such files."""
    import io
    head = bytes(buf[:64])
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return f"{head[24]}-bit PNG" if head[24] > 8 else None
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(bytes(buf))) as im:                     # the header only
                bits = im.tag_v2.get(258) if hasattr(im, "tag_v2") else None     # TIFF BitsPerSample
                bits = max(bits) if isinstance(bits, tuple) else bits
                if (bits and bits > 8) or im.mode in MODES_16 or im.mode in ("I", "F"):
                    return f"{bits or 16}-bit {im.format or 'image'}"
    except Exception:              # not for this check to judge: the decoder names unreadable files
        return None
    return None


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode the image file ``path`` → (H, W, 3) uint8 (module doc). Raises ``ImageReadError``."""
    from PIL import Image, UnidentifiedImageError
    p = Path(path)
    if p.is_dir():
        raise ImageReadError(f"{p}: is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit: make that an error too (one limit)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                limit = _pixel_limit()
                if limit is not None and im.size[0] * im.size[1] > limit:
                    raise ImageReadError(_too_large(p, size=im.size))
                im.load()                          # a full decode: truncated files fail here
                return to_rgb8(im, str(p))
    except FileNotFoundError:
        raise ImageReadError(f"{p}: no such image file", missing=True) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(_too_large(p, e)) from None
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{p}: unreadable or truncated image ({e})") from None


def _too_large(p: Path, e: Exception | None = None, size: tuple[int, int] | None = None) -> str:
    import re
    if size is not None:
        what = f" ({size[0] * size[1]:,} pixels)"
    else:          # Pillow refused at open: its message has the pixel count
        m = re.search(r"\((\d+) pixels\)", str(e))
        what = f" ({int(m.group(1)):,} pixels)" if m else ""
    return (f"{p}: image too large{what}: above {_pixel_limit():,} pixels (Pillow's decompression-bomb limit, "
            "PIL.Image.MAX_IMAGE_PIXELS); downscale it")
