"""Decode untrusted image files into RGB PIL images, and turn them into normalised model tensors.

Every failure becomes an :class:`ImageDecodeError` with a short one-line reason, so a batch run
records it in the image's row and moves on.

Transparency is composited on white: most transparent images are logos, icons and cut-outs
drawn for light pages, and black (PIL's plain ``convert("RGB")`` of premultiplied data) would
change what the model sees far more.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ramtag.errors import DataError

if TYPE_CHECKING:
    import torch

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike, BinaryIO]

#: Sentinel default for ``max_pixels``: PIL's own decompression-bomb limit, read at call time.
PIL_LIMIT = -1

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_BACKGROUND = (255, 255, 255)
_MAX_REASON = 160

_log = logging.getLogger(__name__)
"""Decoder warnings (corrupt EXIF, odd palettes, truncated TIFF tags) go here at debug level, not to the
terminal: tagging a folder of odd images printed hundreds of them. RAMTAG_DEBUG=1 shows them."""

_native_stderr: _NativeStderr | None = None
"""Set in decode workers by :func:`capture_native_stderr` and within :func:`native_stderr_to_log`; else None."""

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
"""Leading bytes of the common formats: a file that starts like one but cannot be opened is a damaged file of
that format, which says more than "not an image"."""

_CORRUPT_DATA = ("broken data stream", "decoder error", "decoding error", "buffer overrun")
"""Pillow's words for image data a decoder gave up on."""
# PIL's bomb check reads a module global; lifting it for one open must not race another thread.
_PIL_LIMIT_LOCK = threading.Lock()


class ImageDecodeError(DataError):
    """An input could not be turned into an image; ``reason`` is a short one-line description."""

    def __init__(self, reason: str) -> None:
        self.reason = _short_reason(reason)
        super().__init__(self.reason)


def _short_reason(text: str) -> str:
    """One line of at most _MAX_REASON characters: it is stored in the output's error column, unlike a message."""
    text = " ".join(str(text).split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _signature_format(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for signature, name in _SIGNATURES if head.startswith(signature)), None)


def _plain_reason(exc: BaseException, image_format: str | None) -> str:
    """What is wrong with the file, in plain words, from the exception a decoder raised."""
    message = str(exc)
    lowered = message.lower()
    if "truncated" in lowered or isinstance(exc, EOFError):
        return "truncated"
    if "MAX_TEXT_CHUNK" in message:
        return "refused: a PNG text chunk decompresses to more than Pillow's limit (a decompression-bomb guard)"
    if any(words in lowered for words in _CORRUPT_DATA):
        return f"damaged {image_format or 'image'} file: its image data is corrupt"
    return f"cannot decode: {message or type(exc).__name__}"


def _log_warnings(caught: list[warnings.WarningMessage]) -> None:
    for warning in caught:
        _log.debug("decoder warning: %s", " ".join(str(warning.message).split()))


class _NativeStderr:
    """Holds file descriptor 2 on a scratch file while a C decoder runs, and logs what it wrote.

    libtiff reports errors ("ZIPDecode: Decoding error at scanline 0, ...") through its default handler, which
    writes to the process's stderr; Pillow silences libtiff's warnings but leaves its errors, and offers no
    way to route either. Swapping fd 2 is only safe where nothing else writes to fd 2 meanwhile: in a decode
    worker, or in a process whose Python ``sys.stderr`` writes to a copy of the descriptor instead
    (:func:`native_stderr_to_log`), so that ramtag's own lines and the progress display, from any thread, never
    land in the scratch file. Decodes in several threads share one swap: the first to start holds fd 2, the
    last to end gives it back and logs what was written.
    """

    def __init__(self) -> None:
        import faulthandler
        import tempfile

        self.pid = os.getpid()  # a forked decode worker makes its own: this one's scratch file is its parent's
        self.terminal = os.dup(2)
        self.scratch = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the decoder
        self._lock = threading.Lock()
        self._decoding = 0
        self._crash_file = None
        if faulthandler.is_enabled():  # a crash inside a decoder is still reported where stderr goes
            self._crash_file = os.fdopen(os.dup(self.terminal), "w")
            faulthandler.enable(file=self._crash_file)

    def __enter__(self) -> None:
        with self._lock:
            self._decoding += 1
            if self._decoding == 1:
                sys.stderr.flush()
                os.ftruncate(self.scratch.fileno(), 0)
                os.lseek(self.scratch.fileno(), 0, os.SEEK_SET)
                os.dup2(self.scratch.fileno(), 2)

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._decoding -= 1
            if self._decoding:
                return
            os.dup2(self.terminal, 2)
            size = os.fstat(self.scratch.fileno()).st_size
            if size:
                os.lseek(self.scratch.fileno(), 0, os.SEEK_SET)
                text = os.read(self.scratch.fileno(), min(size, 16_384)).decode("utf-8", "replace")
                for line in filter(None, (" ".join(line.split()) for line in text.splitlines())):
                    _log.debug("decoder message: %s", _short_reason(line))

    def close(self) -> None:
        """Stop capturing: the crash report goes back to the process's stderr, and the descriptors are closed."""
        if self._crash_file is not None:
            import faulthandler

            try:
                faulthandler.enable(file=sys.__stderr__)
            except (AttributeError, ValueError, OSError):  # no usable stderr left: no crash report either
                faulthandler.disable()
            self._crash_file.close()
        self.scratch.close()
        os.close(self.terminal)


def capture_native_stderr() -> None:
    """From now on, what C decoders write to stderr during :func:`decode_image` goes to the debug log.

    For decode worker processes only (a DataLoader's ``worker_init_fn``): see :class:`_NativeStderr`. A worker
    forked from a process that captures (:func:`native_stderr_to_log`) makes its own capture.
    """
    global _native_stderr
    if _native_stderr is None or _native_stderr.pid != os.getpid():
        _native_stderr = _NativeStderr()


def _capture_here() -> _NativeStderr | nullcontext[None]:
    """The capture this process made; a child forked from a capturing process shares its scratch file, and
    decodes uncaptured until it makes its own."""
    capture = _native_stderr
    return capture if capture is not None and capture.pid == os.getpid() else nullcontext()


def _writes_to_fd_2(stream: object) -> bool:
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):  # a test's capture, a closed stream
        return False


@contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Within the block, what C decoders write to stderr while this process decodes goes to the debug log.

    For a process that decodes itself (``--workers 0``, explain, images the GPU decoder refused): Python's
    ``sys.stderr`` is rebound for the block to a copy of fd 2, so that every Python-level write (ramtag's
    messages, the progress display's thread, logging) reaches the terminal whatever fd 2 holds, and fd 2 is
    swapped only around each decode. A library caller who never enters the block keeps its fd 2 as it was.
    """
    global _native_stderr
    if _native_stderr is not None and _native_stderr.pid == os.getpid():  # already captured here
        yield
        return
    try:
        capture = _NativeStderr()
    except OSError:  # no fd 2 to copy (stderr closed): nothing could reach a terminal anyway
        yield
        return
    python_stderr = sys.stderr
    own_stderr = None
    if _writes_to_fd_2(python_stderr):
        python_stderr.flush()
        own_stderr = open(  # closed below, when the block ends
            os.dup(capture.terminal),
            "w",
            buffering=1,  # line-buffered, as Python's own stderr is
            encoding=python_stderr.encoding,
            errors=python_stderr.errors,
        )
        sys.stderr = own_stderr
    previous, _native_stderr = _native_stderr, capture
    try:
        yield
    finally:
        _native_stderr = previous
        if own_stderr is not None:
            if sys.stderr is own_stderr:
                sys.stderr = python_stderr
            try:
                own_stderr.close()
            except OSError:  # the terminal went away; its last line with it
                pass
        capture.close()


def _resolve_cap(max_pixels: int | None) -> int | None:
    if max_pixels == PIL_LIMIT:
        return Image.MAX_IMAGE_PIXELS
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError("max_pixels must be positive or None")
    return max_pixels


def _as_stream(data: ImageInput) -> BinaryIO:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageDecodeError("empty file")
        return io.BytesIO(data)
    if isinstance(data, (str, os.PathLike)):
        try:
            if os.path.getsize(data) == 0:
                raise ImageDecodeError("empty file")
            return open(data, "rb")  # closed by decode_image
        except OSError as exc:
            raise ImageDecodeError(f"cannot read: {exc.strerror or exc}") from exc
    return data


def _open_lazily(stream: BinaryIO) -> Image.Image:
    """Open (header only); PIL's own bomb check is lifted because the caller applies its cap."""
    start = stream.tell()
    try:
        try:
            return Image.open(stream)
        except Image.DecompressionBombError:
            stream.seek(start)
            with _PIL_LIMIT_LOCK:
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    return Image.open(stream)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    except ImageDecodeError:
        raise
    except Exception as exc:  # PIL raises many types for malformed headers
        stream.seek(start)
        image_format = _signature_format(stream.read(12))
        if isinstance(exc, UnidentifiedImageError):
            reason = f"damaged {image_format} file: its header cannot be read" if image_format else "not an image"
            raise ImageDecodeError(reason) from exc
        raise ImageDecodeError(_plain_reason(exc, image_format)) from exc


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except Exception as exc:  # OSError, SyntaxError, ValueError, zlib.error, struct.error, ...
        raise ImageDecodeError(_plain_reason(exc, img.format)) from exc


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # a broken EXIF block should not cost the image itself
        pass
    return img


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Map 16/32-bit integer and float greyscale onto 0..255 (PIL's convert would clip)."""
    array = np.asarray(img)
    if img.mode == "F":
        array = np.nan_to_num(array.astype(np.float64), nan=0.0)
        scale = 255.0 if array.size and float(array.max()) <= 1.0 else 1.0
        array = array * scale
    elif img.mode.startswith("I;16") or (array.size and 255 < int(array.max()) <= 65535):
        array = array.astype(np.float64) / 257.0  # 16-bit data ("I" is how PIL opens some)
    elif array.size and int(array.max()) > 65535:  # wider data of unknown range: stretch it
        array = array.astype(np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) * (255.0 / (high - low))
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _high_bit_depth_to_l(img)
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: ImageInput,
    max_pixels: int | None = PIL_LIMIT,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode bytes, a path or a binary stream into an RGB image with EXIF orientation applied.

    ``max_pixels`` caps width x height, checked from the header before any pixel is decoded;
    the default is PIL's ``Image.MAX_IMAGE_PIXELS``, ``None`` disables the cap. ``draft_size``
    lets JPEG decode at a reduced scale (still at least ``draft_size`` on each side): much
    faster for large photos that are resized anyway, slightly different pixels. Animated and
    multi-page files give their first frame.

    Raises:
        ImageDecodeError: with a short reason in plain words (``empty file``, ``not an image``, ``truncated``,
            ``damaged PNG file: ...``, ``too many pixels (W x H > cap)``, ``cannot decode: ...``,
            ``cannot read: ...``).
    """
    cap = _resolve_cap(max_pixels)
    stream = _as_stream(data)
    owns_stream = isinstance(data, (str, os.PathLike))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            try:
                with _capture_here():
                    return _decode_open_stream(stream, cap, draft_size)
            finally:
                _log_warnings(caught)
    finally:
        if owns_stream:
            stream.close()


def _decode_open_stream(stream: BinaryIO, cap: int | None, draft_size: int | None) -> Image.Image:
    img = _open_lazily(stream)
    width, height = img.size
    if cap is not None and width * height > cap:
        raise ImageDecodeError(f"too many pixels ({width} x {height} > {cap})")
    if width == 0 or height == 0:
        raise ImageDecodeError(f"cannot decode: empty image ({width} x {height})")
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    _load(img)
    return to_rgb(_apply_orientation(img))


def squash_resize_normalize(
    img: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Resize to ``size`` x ``size`` ignoring aspect ratio, scale to [0, 1], normalise: C x H x W.

    Identical to torchvision's ``Resize((size, size), interpolation) + ToTensor + Normalize``.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    resized = TF.resize(img, [size, size], interpolation=InterpolationMode(interpolation))
    return TF.normalize(TF.to_tensor(resized), mean=list(mean), std=list(std))
