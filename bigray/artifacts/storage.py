"""Local paths and storage URIs behind one set of helpers (pyarrow filesystems for URIs).

Run directories and checkpoints may live on a local disk, NFS or any URI pyarrow and Ray Train
accept (s3://, gs://, file://); everything that reads or writes them goes through here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` storage URIs, False for local paths."""
    return "://" in path


def absolute(path: str) -> str:
    """A URI unchanged, a local path made absolute (Ray workers and replicas run in their own cwd)."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def run_dir(storage_path: str, name: str) -> str:
    """Absolute local path or URI of a run's directory."""
    return absolute(storage_path).rstrip("/") + "/" + name


def write_text(path: str, text: str) -> None:
    """Write a small text file to a local path (atomically) or a storage URI."""
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def read_text(path: str) -> str:
    """Read a small text file from a local path or a storage URI."""
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(p) as f:
            return f.read().decode()
    return Path(path).read_text()


def exists(path: str) -> bool:
    """Whether a file exists at a local path or a storage URI."""
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        return fs.get_file_info(p).type == pafs.FileType.File
    return Path(path).is_file()


def delete_file(path: str) -> None:
    """Remove a file at a local path or a storage URI (nothing to do if it is not there)."""
    if not exists(path):
        return
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        fs.delete_file(p)
        return
    Path(path).unlink(missing_ok=True)


def local_dir(path: str) -> Path:
    """A local directory for a path or storage URI (a URI's files are copied down once)."""
    if not is_uri(path):
        return Path(path).expanduser().resolve()
    import pyarrow.fs as pafs

    fs, fs_path = pafs.FileSystem.from_uri(path)
    dest = Path(tempfile.mkdtemp(prefix="bigray-download-"))
    pafs.copy_files(fs_path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest
