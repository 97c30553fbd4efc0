"""`ramtag model fetch`: download and verify CLIP weights on a machine with network, for air-gapped nodes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ramtag.atomic import atomic_path, write_json
from ramtag.errors import CheckpointError, OutputError, UsageError
from ramtag.messages import first_sentence


def fetch_weights(name: str, tag: str, to: str | Path, source: str | None = None) -> dict:
    """Put `name`/`tag` weights into `to` and check that they load into the architecture.

    Without `source`, open_clip downloads them (Hugging Face hub or the original URL, whose sha256 it checks).
    With `source` (a local file, e.g. copied from a mirror), that file is verified and copied instead.
    Writes `to/NAME-TAG.<ext>` and `to/NAME-TAG.json` (sha256, size, origin); returns that record.
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    from ramtag.fingerprint import file_sha256
    from ramtag.model.weights import load_backbone

    if name not in open_clip.list_models():
        raise UsageError(f"unknown open_clip architecture {name!r}")
    target_dir = Path(to)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--to {to}: cannot create the folder ({exc.strerror or exc})") from None
    if source is not None:
        origin = Path(source)
        if not origin.is_file():
            raise UsageError(f"--from {source}: no such file")
        downloaded = origin
        where = str(origin)
    else:
        config = get_pretrained_cfg(name, tag)
        if not config:
            raise UsageError(f"open_clip knows no pretrained tag {tag!r} for {name}; see open_clip.list_pretrained()")
        downloaded = Path(_download(name, tag, config, str(target_dir / ".download")))
        where = config.get("hf_hub") or config.get("url") or "open_clip"
    load_backbone(name, str(downloaded))  # raises CheckpointError when the file does not fit the architecture
    target = target_dir / f"{name}-{tag}{downloaded.suffix or '.bin'}"
    if downloaded.resolve() != target.resolve():
        with atomic_path(target) as partial:
            shutil.copyfile(downloaded, partial)
    record = {
        "architecture": name,
        "tag": tag,
        "file": target.name,
        "sha256": file_sha256(target),
        "bytes": target.stat().st_size,
        "origin": where,
        "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "use": f"ramtag tag … --model {name} --pretrained {target}",
    }
    write_json(target_dir / f"{name}-{tag}.json", record)
    return record


def _download(name: str, tag: str, config: dict, cache_dir: str) -> str:
    """The weights file, downloaded once; without network one line says so at once (no 50 s of hub retries)."""
    from open_clip.pretrained import download_pretrained

    from ramtag.model.hub import hub_address, hub_reachable
    from ramtag.model.weights import logs_held_unless_it_fails

    if not hub_reachable():
        host, port = hub_address()
        try:  # an earlier, interrupted fetch may have left the download in its cache
            from ramtag.model.weights import cached_weights

            return cached_weights(name, tag, cache_dir=cache_dir)
        except CheckpointError:
            raise CheckpointError(
                f"cannot download {name} {tag}: no network ({host}:{port} cannot be reached); run `ramtag model "
                "fetch` on a machine with network and copy the --to folder here, or verify a copied file with --from"
            ) from None
    try:
        with logs_held_unless_it_fails():
            return download_pretrained(config, cache_dir=cache_dir)
    except Exception as error:  # network failures come in many types
        raise CheckpointError(
            f"download of {name} {tag} failed: {error.__class__.__name__}: {first_sentence(error)}"
        ) from None
