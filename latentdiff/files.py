"""Writing files so that a killed job leaves the old file or the new one, never half of one.

Every writer in latentdiff goes through here: the bytes go to a temporary name beside the target, then
`os.replace` renames it into place (atomic on POSIX within one file system). `durable=True` also fsyncs the
file and its folder, for what must survive a power cut (checkpoints, trained models), not only a kill.

A published file gets the mode the umask gives a new file (0644 under umask 022), whoever wrote it: safetensors
creates its files 0600. A failed write is turned into one sentence naming the target and the cause (`writing`),
and the temporaries of killed or failed writes are recognisable by name (`remove_leftovers`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

_TEMP_FILE = re.compile(r"^\..+\.\d+\.tmp$")  # atomic_path's `.NAME.PID.tmp`


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plainly created file gets under the current umask (0o666 & ~umask)."""
    return 0o666 & ~_umask()


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
        os.chmod(tmp, file_mode())  # a writer may have created it 0600 (safetensors does)
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


def _pid(temp_name: str) -> int:
    return int(temp_name.rsplit(".", 2)[-2])


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

    A kill between the two renames leaves the old version as NAME.old and nothing under NAME; remove_leftovers
    (run at the next start) renames it back, so a reader that starts over finds the old or the new folder.
    """
    tmp, folder = Path(tmp), Path(folder)
    mode = file_mode()
    for root, _, names in os.walk(tmp):  # the contents reach the disk before the rename that publishes them
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fchmod(f.fileno(), mode)  # whatever mode its writer chose (safetensors: 0600)
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


def remove_leftovers(folder) -> list[Path]:
    """Delete what killed or failed writes left in `folder` (not below it); returns what was removed.

    That is atomic_path's `.NAME.PID.tmp` files of processes no longer running (so folders that several jobs share
    are safe), and staging folders `NAME.tmp`. A `NAME.old` is publish_dir's previous version: removed when NAME
    exists, renamed back to NAME when a kill struck between its two renames. Call it only while no other process
    stages folders in `folder`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_dir() and not entry.is_symlink() and name.endswith(".old") and not entry.with_name(name[:-4]).exists():
            os.replace(entry, entry.with_name(name[:-4]))  # the complete previous version, whose successor never landed
        elif entry.is_dir() and not entry.is_symlink() and name.endswith((".tmp", ".old")):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():  # a folder that could not be deleted (busy, permissions) stays, and is not reported
                removed.append(entry)
        elif _TEMP_FILE.match(name) and (entry.is_file() or entry.is_symlink()) and not _process_alive(_pid(name)):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


class WriteError(OSError):
    """A write that failed (full disk, file-size limit, permissions …); str() is one sentence naming target and cause."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno

    def __str__(self) -> str:
        return self.args[0]


def os_error_cause(err: BaseException) -> tuple[int | None, str] | None:
    """(errno, "no space left on device") for an OSError, or for a library error that carries one in its text
    (safetensors: "… (os error 27)"); None when `err` is not about the operating system."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None:
        match = re.search(r"os error (\d+)|\[errno (\d+)\]", str(err), re.IGNORECASE)
        if match is None:
            return None if not isinstance(err, OSError) else (None, str(err) or type(err).__name__)
        code = int(match.group(1) or match.group(2))
    text = os.strerror(code)
    return code, text[:1].lower() + text[1:]


def describe_os_error(err: OSError) -> str:
    """One sentence for any OSError: a WriteError's own, else "PATH: cause." (or the cause alone when it names no file)."""
    if isinstance(err, WriteError):
        return str(err)
    cause = os_error_cause(err)[1]
    paths = " → ".join(os.fspath(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{paths}: {cause}." if paths else f"{cause[:1].upper()}{cause[1:]}."


@contextlib.contextmanager
def writing(target, action: str = "write"):
    """Run a block that writes `target`; an OS failure inside (also one a library wraps, such as safetensors')
    becomes a WriteError "cannot ACTION TARGET: CAUSE." (e.g. "cannot save checkpoint …: no space left on device.")."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:  # noqa: BLE001 — only errors that carry an OS cause are converted; the rest propagate
        cause = os_error_cause(e)
        if cause is None:
            raise
        raise WriteError(f"cannot {action} {target}: {cause[1]}.", cause[0]) from e


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
