"""Local paths and storage URIs behind one set of helpers (pyarrow filesystems for both).

Run directories, checkpoints and prepared data may live on a local disk, NFS or any URI pyarrow
and Ray Train accept (s3://, gs://, file://, with pyarrow's query options such as
``s3://bucket/prefix?endpoint_override=http://host:9000``). Everything that reads or writes them goes
through here, so a location is always a ``str`` that keeps its scheme and options; nothing wraps a
URI in ``Path``. Files a process must open locally (weights, token shards) are copied once per node
into the local cache (``BIGRAY_CACHE_DIR``, default ``~/.cache/bigray``) by :func:`cached_copy`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from bigray.config import uri_credentials

COMPLETE = ".bigray-complete"
"""Written last into a finished local copy: a copy without it is a leftover and is fetched again."""


class StorageError(RuntimeError):
    """A location cannot be read or written: the message names the URI and what is wrong."""


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` storage URIs, False for local paths."""
    return "://" in str(path)


def _split(location: str) -> tuple[str, str]:
    """``("s3://b/p", "?opts")`` for ``"s3://b/p?opts"`` (the query is pyarrow's filesystem options)."""
    if is_uri(location) and "?" in location:
        base, query = location.split("?", 1)
        return base, "?" + query
    return location, ""


def absolute(path: str) -> str:
    """A URI unchanged, a local path made absolute (Ray workers and replicas run in their own cwd)."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


NETWORK_FILESYSTEMS = frozenset(
    "nfs nfs4 lustre cifs smb3 ceph glusterfs gpfs beegfs wekafs efs fuse.s3fs fuse.mountpoint-s3 fuse.gcsfuse "
    "fuse.juicefs fuse.glusterfs fuse.ceph".split()
)
"""Filesystem types (as /proc/mounts names them) that every node of a cluster can mount."""


def network_filesystem(path: str) -> str | None:
    """The type of the network filesystem (NFS, EFS, FSx for Lustre, a FUSE bucket mount) that holds
    the local ``path``, or None when it is on a disk only this machine sees (or not on Linux)."""
    target = Path(path).expanduser().resolve()
    best, kind = "", None
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == Path(point) or Path(point) in target.parents) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind if kind in NETWORK_FILESYSTEMS else None


def join(location: str, *parts: str) -> str:
    """``location/part/...``, keeping a URI's query options at the end."""
    base, query = _split(location)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)]) + query


def name_of(location: str) -> str:
    """The last path component (``checkpoint_000003`` of ``s3://b/run/checkpoint_000003?opts``)."""
    return _split(location)[0].rstrip("/").rsplit("/", 1)[-1]


def parent(location: str) -> str:
    """The location one level up."""
    base, query = _split(location)
    return base.rstrip("/").rsplit("/", 1)[0] + query


def run_dir(storage_path: str, name: str) -> str:
    """Absolute local path or URI of a run's directory."""
    return join(absolute(storage_path), name)


def full_uri(like: str, fs_path: str) -> str:
    """The location of ``fs_path`` on the filesystem of ``like``, with ``like``'s scheme and options.

    Ray reports checkpoint paths relative to their filesystem (``bucket/prefix/...`` for s3); every
    path bigray records goes through here so it keeps its ``s3://`` (and options).
    """
    if not is_uri(like) or is_uri(fs_path):
        return fs_path
    base, query = _split(like)
    scheme = base.split("://", 1)[0]
    return f"{scheme}://{fs_path if scheme == 'file' else fs_path.lstrip('/')}{query}"


def filesystem(location: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local path or URI; StorageError for a bad URI."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    if what := uri_credentials(location):
        raise StorageError(
            f"{location.split('://')[0]}:// location holds credentials ({what}): give them through the "
            "environment (AWS_ACCESS_KEY_ID, ...) or the node's role, never in a location"
        )
    base, query = _split(location)
    if base.startswith("s3://") and "anonymous=true" not in query and not _aws_credentials_found():
        raise StorageError(
            f"no AWS credentials found for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or give the node an instance role), or add ?anonymous=true for a public bucket"
        )
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as e:  # unknown scheme, bad options, a filesystem pyarrow was built without
        raise StorageError(f"cannot use storage location {location}: {e}") from None


@functools.cache
def _aws_credentials_found() -> bool:
    """Whether AWS's default credential chain (environment, config files, web identity, instance
    role) has credentials, asked once per process through botocore, which reads the same chain as
    pyarrow's S3 client. Without this, a missing key shows up as a slow retrying HTTP error."""
    import botocore.session

    return botocore.session.get_session().get_credentials() is not None


@contextlib.contextmanager
def _errors(location: str, doing: str) -> Iterator[None]:
    """Turn pyarrow's OSErrors (unreachable endpoint, denied, missing credentials) into one readable error."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{location} does not exist (while {doing})") from None
    except OSError as e:
        hint = (
            " (check the endpoint, the bucket name and the credentials: AWS_* / GOOGLE_* environment variables)"
            if is_uri(location)
            else ""
        )
        raise StorageError(f"cannot {doing} {location}: {e}{hint}") from None


def write_text(path: str, text: str) -> None:
    """Write a small text file (atomically on a local disk; object stores replace whole objects)."""
    write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a local file via a temp file + rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str, data: bytes) -> None:
    if not is_uri(path):
        atomic_write_bytes(path, data)
        return
    fs, p = filesystem(path)
    with _errors(path, "write"):
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(data)


def read_text(path: str) -> str:
    """Read a small text file from a local path or a storage URI."""
    return read_bytes(path).decode()


def read_bytes(path: str) -> bytes:
    if not is_uri(path):
        return Path(path).read_bytes()
    fs, p = filesystem(path)
    with _errors(path, "read"):
        with fs.open_input_stream(p) as f:
            return f.read()


def kind_of(location: str) -> str:
    """'file', 'dir' or 'missing'."""
    import pyarrow.fs as pafs

    fs, p = filesystem(location)
    with _errors(location, "look up"):
        t = fs.get_file_info(p).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")


def is_file(path: str) -> bool:
    """Whether a file exists at a local path or a storage URI."""
    return kind_of(path) == "file"


def is_dir(location: str) -> bool:
    return kind_of(location) == "dir"


def delete_file(path: str) -> None:
    """Remove a file at a local path or a storage URI (nothing to do if it is not there)."""
    if not is_file(path):
        return
    fs, p = filesystem(path)
    with _errors(path, "delete"):
        fs.delete_file(p)


def delete_dir(location: str) -> None:
    """Remove a directory and everything in it, at a local path or a storage URI."""
    fs, p = filesystem(location)
    with _errors(location, "delete"):
        fs.delete_dir(p)


def file_sizes(location: str) -> dict[str, int]:
    """Every file under a directory, as {relative path: bytes} (one listing call on object stores)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    with _errors(location, "list"):
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    prefix = root.rstrip("/") + "/"
    return {i.path[len(prefix) :]: i.size for i in infos if i.type == pafs.FileType.File and i.path.startswith(prefix)}


def subdirs(location: str) -> list[str]:
    """The locations of a directory's immediate subdirectories (empty when it does not exist)."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    with _errors(location, "list"):
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(root))
    return [join(location, i.base_name) for i in infos if i.type == pafs.FileType.Directory]


def upload(local: str | Path, location: str) -> None:
    """Copy a local file or directory tree to a location (the files it names are replaced)."""
    import pyarrow.fs as pafs

    fs, p = filesystem(location)
    with _errors(location, "upload to"):
        if Path(local).is_dir():
            fs.create_dir(p, recursive=True)
        pafs.copy_files(str(local), p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def cache_root() -> Path:
    """This node's local cache for copies of remote files (``BIGRAY_CACHE_DIR``)."""
    return Path(os.environ.get("BIGRAY_CACHE_DIR") or Path.home() / ".cache" / "bigray").expanduser()


class FileLock:
    """An exclusive lock file, so concurrent processes on one node build or fetch something once."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _cache_prefix(location: str, parts: Sequence[str], area: str) -> Path:
    key = hashlib.sha256(json.dumps([location, sorted(parts)]).encode()).hexdigest()[:12]
    return cache_root() / area / f"{name_of(location)}-{key}"


def _fingerprint(location: str, parts: Sequence[str]) -> str:
    """What is in storage now (every file's path, size and modification time, from one listing):
    a copy is reused only while this is unchanged, so a rewritten object is never served stale."""
    import pyarrow.fs as pafs

    fs, root = filesystem(location)
    with _errors(location, "list"):
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    prefix = root.rstrip("/") + "/"
    wanted = [f"{prefix}{p}" for p in parts]
    listing = sorted(
        (i.path, i.size, str(i.mtime))
        for i in infos
        if i.type == pafs.FileType.File
        and (not parts or any(i.path == w or i.path.startswith(w + "/") for w in wanted))
    )
    if not listing:
        raise StorageError(f"{location} does not exist or holds no files")
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:12]


def cached_copy(location: str, parts: Sequence[str] = (), area: str = "copies") -> Path:
    """A local directory holding ``location`` (only its ``parts``, relative paths, when given).

    A local path is returned as it is. A URI is copied once per node (under a lock, so workers on
    the same node share one download) and reused while the objects in storage are unchanged; each
    download is logged in ``<cache>/downloads.jsonl``.
    """
    if not is_uri(location):
        return Path(location).expanduser().resolve()
    import pyarrow.fs as pafs

    prefix = _cache_prefix(location, parts, area)
    with FileLock(prefix.with_name(prefix.name + ".lock")):
        dest = prefix.with_name(f"{prefix.name}-{_fingerprint(location, parts)}")
        if (dest / COMPLETE).is_file():
            return dest
        for stale in prefix.parent.glob(f"{prefix.name}-*"):  # copies of what storage held before, and leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.with_name(dest.name + ".partial")
        tmp.mkdir(parents=True)
        fs, root = filesystem(location)
        t0 = time.time()
        with _errors(location, "download"):
            for part in parts or [""]:
                src = f"{root.rstrip('/')}/{part}" if part else root
                target = tmp / part if part else tmp
                found = fs.get_file_info(src).type
                if found == pafs.FileType.NotFound:
                    raise StorageError(f"{join(location, part)} does not exist")
                (target if found == pafs.FileType.Directory else target.parent).mkdir(parents=True, exist_ok=True)
                pafs.copy_files(src, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        (tmp / COMPLETE).write_text(location + "\n")
        tmp.rename(dest)
        record = {
            "location": location,
            "parts": list(parts),
            "to": str(dest),
            "seconds": round(time.time() - t0, 3),
            "pid": os.getpid(),
        }
        with open(cache_root() / "downloads.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return dest


def drop_copy(location: str, parts: Sequence[str] = (), area: str = "copies") -> None:
    """Remove this node's copies of ``location`` (nothing for a local path)."""
    if is_uri(location):
        prefix = _cache_prefix(location, parts, area)
        with FileLock(prefix.with_name(prefix.name + ".lock")):
            for copy in prefix.parent.glob(f"{prefix.name}-*"):
                shutil.rmtree(copy, ignore_errors=True)


def cached_file(location: str) -> Path:
    """A local path for one file: a local path as it is, a URI copied to this node (again when it changed)."""
    if not is_uri(location):
        return Path(location).expanduser().resolve()
    import pyarrow.fs as pafs

    prefix = _cache_prefix(location, (), "files")
    with FileLock(prefix.with_name(prefix.name + ".lock")):
        fs, p = filesystem(location)
        with _errors(location, "look up"):
            info = fs.get_file_info(p)
        if info.type != pafs.FileType.File:
            raise StorageError(f"{location} does not exist")
        dest = prefix.with_name(
            f"{prefix.name}-{hashlib.sha256(f'{info.size}{info.mtime}'.encode()).hexdigest()[:12]}"
        ) / name_of(location)
        if not dest.is_file():
            for stale in prefix.parent.glob(f"{prefix.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            write_bytes(str(dest), read_bytes(location))
        return dest
