"""Tiny images, folders, manifests and WebDataset shards generated from seeds (for IO tests)."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 16


def run_cli(*args) -> int:
    """``ramtag ARGS`` in this process; the exit status it would give (every argument is made a string)."""
    from ramtag.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def random_pixels(seed: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE), channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> bytes:
    """An RGB image of seeded noise, encoded as ``fmt``."""
    return encode(Image.fromarray(random_pixels(seed, size), mode="RGB"), fmt)


def write_image(path: Path, seed: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower().lstrip(".")
    fmt = fmt or {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(suffix, suffix.upper())
    path.write_bytes(image_bytes(seed, fmt))
    return path


def png_claiming_size(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar: each sample is (key, {extension: bytes})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                info.mtime = 0
                archive.addfile(info, io.BytesIO(data))
    return path


def image_shard(path: Path, keys: list[str], first_seed: int = 0) -> Path:
    return write_shard(
        path, [(key, {"jpg": image_bytes(first_seed + i, "JPEG"), "txt": b"x"}) for i, key in enumerate(keys)]
    )


def write_tag_table(output, labels, units, *, metadata=None, all_scores=False, extra_schema=None, part_rows=262_144,
                    stdout=None, **prepare) -> Path | None:
    """A tag table written the way `ramtag tag` writes one, without a model: ``units`` maps a work unit id to
    its :class:`~ramtag.data.rows.TagBatch` es; each unit's rows go to its part files and the unit is committed
    to the ledger, then the table is assembled from every unit the ledger holds. ``prepare`` goes to
    :func:`~ramtag.data.layout.prepare_output` (resume, overwrite, identity). Returns the output (None for -)."""
    from ramtag.data.assemble import finish_units
    from ramtag.data.layout import _unlock_output, prepare_output
    from ramtag.data.ledger import latest_entries
    from ramtag.data.parts import UnitPartWriter
    from ramtag.data.rows import schema_with_metadata, table_schema
    from ramtag.data.units import UnitEnd

    layout = prepare_output(output, **prepare)
    metadata = {"model": "m"} if metadata is None else metadata
    table = table_schema(extra_schema, all_scores)
    writer = UnitPartWriter(
        None if layout is None else layout.work_dir, schema_with_metadata(table, metadata), labels,
        run=0 if layout is None else layout.run, part_rows=part_rows, row_group_rows=min(16_384, part_rows),
        stdout=stdout,
    )
    for unit, batches in units.items():
        for batch in batches:
            writer.write(batch, [unit] * len(batch))
        writer.commit(UnitEnd(unit, None, (), 0, 0, {}))
    writer.close()
    if layout is None:
        return None
    finish_units(layout.output, layout.kind, layout.work_dir, sorted(latest_entries(layout.work_dir)), metadata,
                 table)
    _unlock_output(layout.output)
    return layout.output
