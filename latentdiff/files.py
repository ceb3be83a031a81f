"""Writing files so that a killed job leaves the old file or the new one, never half of one.

Every writer in latentdiff goes through here: the bytes go to a temporary name beside the target, then
`os.replace` renames it into place (atomic on POSIX within one file system). `durable=True` also fsyncs the
file and its folder, for what must survive a power cut (checkpoints, trained models), not only a kill.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, *, durable: bool = False):
    """Yield a temporary path beside `path` to write to; it becomes `path` only if the block succeeds.

    The temporary name carries the process id, so processes sharing a folder never write the same one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _naming(e, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes, *, durable: bool = False) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str, *, durable: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def create_exclusive_bytes(path, data: bytes) -> None:
    """Write a new file atomically, never replacing one: FileExistsError if `path` exists (even if another
    process creates it meanwhile). The complete temporary file is hard-linked to the name, which fails if taken."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.link(tmp, path)
    except OSError as e:
        raise _naming(e, path)
    finally:
        tmp.unlink(missing_ok=True)


def _naming(error: OSError, path: Path) -> OSError:
    """A failed write names the file it was for (a full disk raises from write() with no file name)."""
    if error.filename is None or str(error.filename).endswith(".tmp"):
        error.filename = str(path)
    return error


def remove_stale_temporaries(folder) -> int:
    """Delete the `.NAME.PID.tmp` files of processes that no longer run (a kill or a full disk left them)."""
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def staging_dir(folder) -> Path:
    """The temporary twin `NAME.tmp` in which a folder is built before `publish_dir` swaps it in.

    The name is fixed (not per process) so every process of a multi-process save writes into the same one.
    """
    folder = Path(folder)
    return folder.with_name(folder.name + ".tmp")


def publish_dir(tmp, folder) -> None:
    """Swap a completely written folder into place: an existing `folder` is moved aside first, then removed.

    A kill leaves either the old folder or the new one under the name (and at worst a stray NAME.old).
    """
    tmp, folder = Path(tmp), Path(folder)
    for root, _, names in os.walk(tmp):  # the contents reach the disk before the rename that publishes them
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)
    _fsync_dir(folder.parent)


@contextlib.contextmanager
def atomic_dir(folder):
    """Yield an empty staging folder to fill; it replaces `folder` (durably) only if the block succeeds."""
    tmp = staging_dir(folder)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier save
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
