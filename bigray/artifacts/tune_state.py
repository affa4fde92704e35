"""What ``bigray tune --resume`` trusts: a search directory's state files, as the search signed them.

Ray Tune restores a search from pickles (``tuner.pkl``, the searcher's state) and from JSON that may
embed cloudpickle; whoever can write the search's directory (a shared or copied bucket) could run
code on the driver through them. So the search signs what it writes: ``bigray-state.json`` lists the
sha256 of every state file, with an HMAC-SHA256 over the list under a key the directory never holds
(``BIGRAY_TUNE_STATE_KEY``, or a key made once per user in ``~/.config/bigray/tune-state-key``), and
a resume first checks every state file against it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from bigray.artifacts.storage import filesystem, join, read_bytes, write_text
from bigray.config import ConfigError

MANIFEST = "bigray-state.json"
KEY_ENV = "BIGRAY_TUNE_STATE_KEY"


def is_state_file(name: str) -> bool:
    """A top-level file a resume loads: Tune's pickles, its experiment and searcher state (JSON that
    may embed cloudpickle), and bigray's tune_job.json (the trials' config)."""
    if name == MANIFEST:
        return False
    return name.endswith(".pkl") or name == "tune_job.json" or (name.endswith(".json") and "state" in name)


def _key() -> bytes:
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        return key.encode()
    path = Path.home() / ".config" / "bigray" / "tune-state-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        except FileExistsError:  # another search made it first
            pass
    return path.read_text().strip().encode()


def _mac(digests: dict[str, str]) -> str:
    return hmac.new(_key(), json.dumps(digests, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sign(directory: str, digests: dict[str, str]) -> None:
    """Write the signed manifest of ``digests`` (file name -> sha256) into ``directory``."""
    write_text(join(directory, MANIFEST), json.dumps({"files": digests, "hmac": _mac(digests)}, indent=1) + "\n")


def check_state(directory: str) -> None:
    """Refuse (ConfigError) a search directory whose state files are not all as the search signed
    them, before anything of them is unpickled."""
    import pyarrow.fs as pafs

    where = f"{directory}/{MANIFEST}"
    try:
        manifest = json.loads(read_bytes(join(directory, MANIFEST)))
        digests, mac = dict(manifest["files"]), str(manifest["hmac"])
    except Exception as e:  # missing, unreadable or not the manifest's shape
        raise ConfigError(
            "--resume",
            f"{where} is missing or unreadable ({type(e).__name__}): refusing to load the search's pickles unsigned",
        ) from None
    if not hmac.compare_digest(mac, _mac(digests)):
        raise ConfigError(
            "--resume",
            f"{where} is not signed with this machine's key ({KEY_ENV} or "
            "~/.config/bigray/tune-state-key): resume where the search ran, or set the same key",
        )
    fs, path = filesystem(directory)
    for info in fs.get_file_info(pafs.FileSelector(path)):
        name = info.base_name
        if info.type != pafs.FileType.File or not is_state_file(name):
            continue
        if digests.get(name) != digest(read_bytes(join(directory, name))):
            raise ConfigError(
                "--resume",
                f"{directory}/{name} is not the file the search wrote (unsigned or changed since): refusing to load it",
            )
