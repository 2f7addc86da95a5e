"""Atomic artefact writes: a failed run never leaves a half-written file or replaces a good one, and
concurrent writers of the same path never collide.

Temp names carry the writer's host and process id (`.<name>.<host>-<pid>.<random>.tmp`), so that a later
run can tell the leftovers of a killed writer from the work of a live one (`sweep_leftovers`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
STALE_TEMP_SECONDS = 24 * 3600  # a temp of another host is only swept once this old


def _owner() -> str:
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.{_owner()}."


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=TEMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; on success it becomes `path`.

    replace=True: an existing `path` is swapped out (moved aside under a unique name, then deleted), retrying
    if a concurrent writer puts a new one in between. replace=False: if `path` exists when the block ends
    (an identical version another run finished first), the existing one is kept and the temp discarded."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), suffix=TEMP_SUFFIX, dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the artefact is not
    try:
        yield tmp
        while True:
            old = None
            if replace and final.exists():
                old = final.with_name(f"{_temp_prefix(final)}{uuid.uuid4().hex[:8]}.old{TEMP_SUFFIX}")
                with contextlib.suppress(FileNotFoundError):  # another writer moved it first
                    os.replace(final, old)
            try:
                os.rename(tmp, final)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if not replace:
                    break  # the same version landed first: keep it
                continue  # a concurrent writer recreated `final` between our two renames
            finally:
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            break
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _writer_is_gone(name: str, age_seconds: float) -> bool:
    """Whether the writer of a temp named by `_temp_prefix` can no longer finish it: a dead process on this
    host, or any temp older than STALE_TEMP_SECONDS (another host's writer cannot be asked)."""
    parts = name.removesuffix(TEMP_SUFFIX).split(".")
    owners = [p for p in parts if "-" in p and p.rsplit("-", 1)[1].isdigit()]
    if not owners or age_seconds > STALE_TEMP_SECONDS:
        return True
    host, pid = owners[-1].rsplit("-", 1)  # the owner follows the artefact's own name
    return host == socket.gethostname().replace(".", "_") and not process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether a process of this host with that id exists (0: none was recorded)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def sweep_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files and folders under `folder` whose writer was killed; returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in sorted(folder.rglob(f".*{TEMP_SUFFIX}"), key=lambda p: len(p.parts)):
        try:
            age = now - path.lstat().st_mtime
        except FileNotFoundError:
            continue
        if _writer_is_gone(path.name, age):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj: Any, length: int = 12) -> str:
    """Short content hash of a JSON-able object (config dicts, id lists): used for versions and caches."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
