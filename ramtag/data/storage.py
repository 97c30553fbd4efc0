"""Every decision about where bytes live: a local path, or an object store URL (``s3://``, ``gs://``, others).

Object stores are reached through ``pyarrow.fs``, which pyarrow's wheels build with S3 and Google Cloud
Storage support, so the core install needs nothing more; other schemes (``az://``, ``hf://``, ...) and a
pyarrow built without S3 go through fsspec when the ``remote`` extra is installed (``pip install
'ramtag[remote]'``). The rest of ramtag asks this module whether a name is remote and to read, list, write
or copy it; no other module parses a URL.

Credentials come from the environment only (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``; for GCS:
``GOOGLE_APPLICATION_CREDENTIALS``), through the SDKs' own chains; ramtag never stores or prints them, and
the messages below name only the URL and the reason.

Objects have no rename: an object appears whole when its upload completes, or not at all, so a
writer puts each file directly under its final, unique name (see :mod:`ramtag.data.remote_output`).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from ramtag.errors import DataError, OutputError

REMOTE_EXTRA = "pip install 'ramtag[remote]'"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Schemes the tag inputs read another way: local files, and http(s) shards that webdataset streams with curl.
_NOT_OBJECT_STORAGE = frozenset({"file", "http", "https", "pipe"})
_PYARROW_SCHEMES = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem"}


def scheme(target: str) -> str | None:
    """The URL scheme of ``target`` (lower case), or None for a plain path."""
    match = _SCHEME_RE.match(str(target))
    return match.group(1).lower() if match else None


def is_remote(target: str | os.PathLike) -> bool:
    """Whether ``target`` names an object store (``s3://``, ``gs://``, any fsspec scheme), not a local path."""
    if isinstance(target, os.PathLike):
        return False
    found = scheme(target)
    return found is not None and found not in _NOT_OBJECT_STORAGE


def split(url: str) -> tuple[str, str]:
    """``("s3", "bucket/key/...")``: the scheme and the path that a filesystem of that scheme takes."""
    found = scheme(url)
    if found is None:
        raise ValueError(f"{url} is not a URL")
    return found, url[len(found) + 3 :]


def join(url: str, *names: str) -> str:
    """``url`` with ``names`` appended, one slash between each."""
    text = url.rstrip("/")
    for name in names:
        text = f"{text}/{name.strip('/')}"
    return text


def parent(url: str) -> str:
    """The URL one level up (``s3://b/a/x`` -> ``s3://b/a``)."""
    return url.rstrip("/").rsplit("/", 1)[0]


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def bucket(url: str) -> str:
    """The bucket (or container) of a URL."""
    return split(url)[1].split("/", 1)[0]


class MissingSupport(DataError):
    """An object store URL that this install cannot read (pyarrow without that filesystem, no fsspec)."""


@functools.lru_cache(maxsize=16)
def _filesystem_for(scheme_name: str, bucket_name: str) -> Any:
    if scheme_name in _PYARROW_SCHEMES:
        import pyarrow.fs as pafs

        if hasattr(pafs, _PYARROW_SCHEMES[scheme_name]):
            _check_credentials(scheme_name)
            try:
                filesystem, _ = pafs.FileSystem.from_uri(f"{scheme_name}://{bucket_name}")
                return filesystem
            except Exception as exc:  # a region look-up that fails, a malformed endpoint
                reason = _reason(exc)
                raise DataError(f"{scheme_name}://{bucket_name}: cannot reach the object store ({reason})") from exc
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem
    except ImportError:
        raise MissingSupport(
            f"{scheme_name}:// URLs need object-storage support that this install lacks: {REMOTE_EXTRA}"
        ) from None
    try:
        return PyFileSystem(FSSpecHandler(fsspec.filesystem(scheme_name)))
    except (ImportError, ValueError) as exc:
        raise MissingSupport(
            f"{scheme_name}:// URLs need an fsspec filesystem for {scheme_name} ({_reason(exc)}): {REMOTE_EXTRA}"
        ) from None


def _check_credentials(scheme_name: str) -> None:
    """Refuse up front an S3 URL that no credential could reach: no keys, no profile, and the instance
    metadata service switched off (where it is on, the SDK may still find a role, so nothing is refused)."""
    if scheme_name != "s3" or os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        return
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if any(os.environ.get(name) for name in names):
        return
    files = (
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE", os.path.expanduser("~/.aws/credentials")),
        os.environ.get("AWS_CONFIG_FILE", os.path.expanduser("~/.aws/config")),
    )
    if not any(os.path.isfile(path) for path in files):
        raise DataError(
            "s3:// needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
            "environment"
        )


def filesystem(url: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for an object store URL; one filesystem per bucket, reused."""
    scheme_name, path = split(url)
    if "@" in path.split("/", 1)[0]:  # s3://KEY:SECRET@bucket/: it would land in messages and the source column
        raise DataError(
            f"{scheme_name}://…@{path.split('@', 1)[1].split('/', 1)[0]}: credentials in URLs are not accepted; "
            "set them in the environment"
        )
    return _filesystem_for(scheme_name, path.split("/", 1)[0]), path


def _reason(exc: BaseException) -> str:
    """One line for a filesystem error, without the SDK's request ids and stack (nor any secret: the SDKs
    never put credentials into messages, and neither does this)."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\. Detail: \[errno \d+\] No such file or directory", "", text)
    return text[:300] or type(exc).__name__


def describe(url: str, exc: BaseException) -> str:
    """``url: why`` in one line, naming what to do where that is known."""
    if isinstance(exc, MissingSupport | DataError | OutputError):
        return str(exc)
    text = _reason(exc)
    lowered = text.lower()
    if "bucket" in lowered and ("not found" in lowered or "does not exist" in lowered or "nosuchbucket" in lowered):
        return f"{url}: the bucket {bucket(url)} does not exist (or these credentials cannot see it)"
    if "access denied" in lowered or "accessdenied" in lowered or "forbidden" in lowered or "403" in lowered:
        return f"{url}: access denied (check the credentials in the environment and the bucket's permissions)"
    if isinstance(exc, FileNotFoundError) or "path does not exist" in lowered:
        return f"{url}: no such object"
    return f"{url}: {text}"


def _wrapped(url: str, exc: BaseException, error: type[Exception] = DataError) -> Exception:
    if isinstance(exc, MissingSupport | DataError | OutputError):
        return exc
    return error(describe(url, exc))


# ---------------------------------------------------------------------------------------------
# Reading


def open_input(url: str) -> Any:
    """A readable binary stream of the object (the caller closes it)."""
    fs, path = filesystem(url)
    try:
        return fs.open_input_stream(path)
    except Exception as exc:
        raise _wrapped(url, exc) from exc


def open_random_access(url: str) -> Any:
    """A seekable file of the object (Parquet footers, CSV readers)."""
    fs, path = filesystem(url)
    try:
        return fs.open_input_file(path)
    except Exception as exc:
        raise _wrapped(url, exc) from exc


def read_bytes(url: str) -> bytes:
    with open_input(url) as stream:
        return stream.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def file_type(url: str) -> str:
    """``"file"``, ``"dir"`` or ``"missing"`` (a prefix with objects below it is a dir)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url)
    try:
        info = fs.get_file_info(path.rstrip("/"))
    except Exception as exc:
        raise _wrapped(url, exc) from exc
    if info.type == pafs.FileType.File:
        return "file"
    if info.type == pafs.FileType.Directory:
        return "dir"
    return "missing"


def exists(url: str) -> bool:
    return file_type(url) != "missing"


def list_files(prefix: str, *, recursive: bool = True) -> list[tuple[str, int]]:
    """``(url, size)`` of every object below ``prefix``, sorted by URL; empty when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(prefix)
    scheme_name = split(prefix)[0]
    try:
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=recursive, allow_not_found=True))
    except Exception as exc:
        raise _wrapped(prefix, exc) from exc
    return sorted((f"{scheme_name}://{info.path}", info.size or 0) for info in infos if info.type == pafs.FileType.File)


def names_below(prefix: str) -> list[str]:
    """Names of the objects directly below ``prefix`` (not recursive)."""
    return [basename(url) for url, _ in list_files(prefix, recursive=False)]


def has_magic(url: str) -> bool:
    return any(char in url for char in "*?[")


def glob(pattern: str) -> list[str]:
    """Objects matching a glob over a bucket prefix (``*`` stays within one level, ``**`` crosses levels)."""
    scheme_name, path = split(pattern)
    literal = re.split(r"[*?\[]", path, maxsplit=1)[0]
    prefix = literal.rsplit("/", 1)[0] if "/" in literal else literal
    regex = _glob_regex(path)
    found = list_files(f"{scheme_name}://{prefix}", recursive=True)
    return [url for url, _ in found if regex.fullmatch(split(url)[1])]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    pieces = []
    for index, part in enumerate(re.split(r"(\*\*/?)", pattern)):
        if index % 2:
            pieces.append(".*")
        else:  # fnmatch's * crosses slashes; objects' single-level * must not
            pieces.append(fnmatch.translate(part).removeprefix("(?s:").removesuffix(")\\Z").replace(".*", "[^/]*"))
    return re.compile("".join(pieces), re.S)


def list_images(url: str, extensions: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(key, url)`` of an image object (its key: the URL), or of every image below a prefix (keys relative to
    it, as for a local folder), sorted; a URL that names nothing is refused in one line."""
    kind = file_type(url)
    if kind == "missing":
        check_bucket(url, DataError)
        raise DataError(f"{url}: no such object or prefix")
    if kind == "file":
        yield url, url
        return
    prefix = url.rstrip("/") + "/"
    wanted = frozenset(extensions)
    for child, _ in list_files(prefix):
        if os.path.splitext(child)[1].lower() in wanted:
            yield child[len(prefix) :], child


def read_listed_image(url: str) -> tuple[bytes | None, str | None]:
    """The bytes of an image that a list or manifest names by URL, or the reason (for its error row) why not."""
    if not is_remote(url):  # http(s)
        return None, f"{scheme(url)}:// URLs in lists and manifests are not read; use object storage or files"
    try:
        return read_bytes(url), None
    except MissingSupport as exc:
        return None, f"remote URLs in lists are read through the object-storage extra, which is missing ({exc})"
    except Exception as exc:
        return None, f"cannot read: {describe(url, exc)}"


def iter_lines(url: str) -> Iterator[str]:
    """The lines of a text object (a list of images), decoded as UTF-8, streamed: a list of millions of paths
    is never held whole."""
    import io

    with open_input(url) as stream:
        yield from (line.rstrip("\r\n") for line in io.TextIOWrapper(stream, encoding="utf-8", newline=""))


# ---------------------------------------------------------------------------------------------
# Writing: each object appears whole when its upload completes, so no temporary names or renames


def write_bytes(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    try:
        with fs.open_output_stream(path) as stream:
            stream.write(data)
    except Exception as exc:
        raise _wrapped(url, exc, OutputError) from exc


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def upload(local: str | os.PathLike, url: str) -> None:
    """Copy a local file to ``url``; the object appears when the copy is complete. A copy that fails part-way is
    deleted (closing a stream completes the upload, so a broken copy would otherwise stay as a short object)."""
    import shutil

    fs, path = filesystem(url)
    failure: BaseException | None = None
    try:
        with open(local, "rb") as source, fs.open_output_stream(path) as target:
            try:
                shutil.copyfileobj(source, target, 8 << 20)
            except BaseException as exc:
                failure = exc
    except Exception as exc:
        failure = failure or exc
    if failure is not None:
        try:
            fs.delete_file(path)
        except Exception:
            pass
        if isinstance(failure, Exception):
            raise _wrapped(url, failure, OutputError) from failure
        raise failure


def download(url: str, local: str | os.PathLike) -> None:
    """Copy ``url`` to a local file (written aside and renamed into place)."""
    import shutil

    from ramtag.atomic import atomic_path

    with atomic_path(local) as temporary, open_input(url) as source, open(temporary, "wb") as target:
        shutil.copyfileobj(source, target, 8 << 20)


def copy(source: str, target: str) -> None:
    """Copy an object inside one store (server side where the store can)."""
    fs, source_path = filesystem(source)
    _, target_path = filesystem(target)
    try:
        fs.copy_file(source_path, target_path)
    except Exception as exc:
        raise _wrapped(target, exc, OutputError) from exc


def delete(url: str) -> None:
    """Remove an object; a missing one is no error."""
    fs, path = filesystem(url)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except Exception as exc:
        raise _wrapped(url, exc, OutputError) from exc


def delete_below(prefix: str) -> None:
    """Remove every object below ``prefix``."""
    for url, _ in list_files(prefix):
        delete(url)


@functools.lru_cache(maxsize=64)
def _bucket_checked(scheme_name: str, bucket_name: str) -> None:
    check_bucket(f"{scheme_name}://{bucket_name}/", DataError)


def check_bucket_once(url: str) -> None:
    """:func:`check_bucket` for inputs, one request per bucket however many shards name it."""
    _bucket_checked(split(url)[0], bucket(url))


def check_bucket(url: str, error: type[Exception] = OutputError) -> None:
    """Refuse, in one line, a URL whose bucket is missing or cannot be reached with these credentials."""
    import pyarrow.fs as pafs

    fs, _ = filesystem(url)
    name = bucket(url)
    try:
        info = fs.get_file_info(name)
    except Exception as exc:
        raise _wrapped(url, exc, error) from exc
    if info.type == pafs.FileType.NotFound:
        raise error(f"{url}: the bucket {name} does not exist (or these credentials cannot see it)")
