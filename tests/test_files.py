"""latentdiff.files: published files get the umask's mode, failed writes are one sentence, leftovers are recognised."""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from latentdiff.files import (WriteError, atomic_dir, atomic_path, atomic_write_text, describe_os_error, file_mode,
                              os_error_cause, remove_leftovers, writing)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_published_files_get_the_umask_mode_even_from_safetensors(tmp_path, umask_027):
    assert file_mode() == umask_027
    save_file({"a": torch.zeros(2)}, tmp_path / "raw.safetensors")
    assert mode(tmp_path / "raw.safetensors") == 0o600  # what safetensors does on its own
    with atomic_path(tmp_path / "one.safetensors") as tmp:
        save_file({"a": torch.zeros(2)}, tmp)
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "sub").mkdir()
        save_file({"a": torch.zeros(2)}, tmp / "sub" / "w.safetensors")
    atomic_write_text(tmp_path / "t.json", "{}")
    for path in (tmp_path / "one.safetensors", tmp_path / "folder" / "sub" / "w.safetensors", tmp_path / "t.json"):
        assert mode(path) == umask_027, path


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022, 0o077])
def test_file_mode_is_the_mode_of_a_plainly_created_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        (tmp_path / "plain").write_text("")  # open() creates with 0o666, less the umask
        assert file_mode() == mode(tmp_path / "plain")
    finally:
        os.umask(old)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the umask from /proc")
def test_the_umask_is_read_without_setting_it(umask_027, monkeypatch):
    """os.umask reads it only by setting it, and a file another thread creates meanwhile would get the wrong mode."""
    calls, real = [], os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
    assert file_mode() == umask_027 and calls == []


def test_without_proc_the_umask_is_still_read_and_left_as_it_was(umask_027, monkeypatch):
    real = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self).startswith("/proc/"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    assert file_mode() == umask_027
    assert os.umask(0o027) == 0o027


def test_writing_turns_os_failures_into_one_sentence(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(WriteError) as info, writing(target, "save the model to"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == f"cannot save the model to {target}: no space left on device."
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(WriteError) as info, writing(target, "save the model to"):  # safetensors' own error type
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    assert str(info.value) == f"cannot save the model to {target}: file too large."
    with pytest.raises(KeyError), writing(target):  # not about the operating system: left alone
        raise KeyError("x")
    assert describe_os_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y")) == "/x/y: no such file or directory."
    assert describe_os_error(OSError(errno.EFBIG, "File too large")) == "File too large."


def test_a_cause_is_found_in_a_wrapped_errors_text_or_else_is_the_errors_own_text(tmp_path):
    target = tmp_path / "grid.png"
    with pytest.raises(WriteError) as info, writing(target):  # a library that re-raises an OSError as text
        raise RuntimeError(f"saving failed: {OSError(errno.ENOSPC, 'No space left on device')}")
    assert str(info.value) == f"cannot write {target}: no space left on device." and info.value.errno == errno.ENOSPC
    with pytest.raises(WriteError) as info, writing(target):  # an OSError with no errno
        raise OSError("Unexpected end of stream")
    assert str(info.value) == f"cannot write {target}: Unexpected end of stream." and info.value.errno is None
    with pytest.raises(WriteError) as info, writing(target):  # ... and no text either
        raise TimeoutError()
    assert str(info.value) == f"cannot write {target}: TimeoutError."
    assert os_error_cause(WriteError(str(info.value), errno.ENOSPC)) == (errno.ENOSPC, "no space left on device")


def test_describe_os_error_names_both_paths_of_a_failed_rename_and_keeps_a_write_errors_sentence(tmp_path):
    with pytest.raises(OSError) as info:
        os.replace(tmp_path / "a", tmp_path / "b")
    assert describe_os_error(info.value) == f"{tmp_path / 'a'} → {tmp_path / 'b'}: no such file or directory."
    sentence = f"cannot save checkpoint {tmp_path / 'ckpt'}: no space left on device."
    assert describe_os_error(WriteError(sentence, errno.ENOSPC)) == sentence


def test_failed_writes_leave_nothing_and_leftovers_are_recognised(tmp_path):
    with pytest.raises(OSError), atomic_path(tmp_path / "f.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / f".log.jsonl.{dead}.tmp").write_text("x")  # atomic_path's temporary of a killed process
    (tmp_path / f".00001.png.{os.getpid()}.tmp").write_text("x")  # a live writer's (another job in a shared folder)
    (tmp_path / "ckpt-000004.tmp").mkdir()  # a staging folder
    (tmp_path / "model").mkdir()
    (tmp_path / "model.old").mkdir()  # publish_dir's previous version, its successor in place
    (tmp_path / "vae.old").mkdir()  # killed between publish_dir's two renames: the old version comes back
    (tmp_path / "vae.old" / "config.json").write_text("{}")
    (tmp_path / "keep.tmp").write_text("a user's file")  # not a name files.py makes
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [f".log.jsonl.{dead}.tmp", "ckpt-000004.tmp", "model.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".00001.png.{os.getpid()}.tmp", "keep.tmp", "model", "vae"]
    assert (tmp_path / "vae" / "config.json").is_file()


def test_remove_leftovers_never_signals_a_live_writer(tmp_path):
    """Whether a temporary's writer still runs is asked with signal 0, which delivers nothing to it."""
    received = []
    old = signal.signal(signal.SIGHUP, lambda signum, frame: received.append(signum))
    try:
        (tmp_path / f".a.png.{os.getpid()}.tmp").write_text("x")
        assert remove_leftovers(tmp_path) == [] and received == []
    finally:
        signal.signal(signal.SIGHUP, old)


def test_remove_leftovers_keeps_the_temporary_of_another_users_live_process(tmp_path, monkeypatch):
    def kill(pid, sig):  # what the kernel answers about another user's process (never to root, as here)
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    (tmp_path / ".log.jsonl.4242.tmp").write_text("x")
    assert remove_leftovers(tmp_path) == [] and (tmp_path / ".log.jsonl.4242.tmp").exists()


def test_remove_leftovers_is_not_stopped_by_a_concurrent_cleaner_or_an_undeletable_leftover(tmp_path, monkeypatch):
    """Two jobs starting in a shared folder both clean it: a temporary the other one removed first is no error, nor is
    a staging folder that cannot be removed (EBUSY: a file still open on NFS); the rest is still cleaned."""
    real_rmdir = os.rmdir

    def kill(pid, sig):  # the writer is gone, and the other cleaner removes its temporary just now
        (tmp_path / f".a.png.{pid}.tmp").unlink()
        raise ProcessLookupError(errno.ESRCH, "No such process")

    def rmdir(path, *args, **kwargs):
        if os.fspath(path).endswith("busy.tmp"):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(os, "rmdir", rmdir)
    (tmp_path / ".a.png.4242.tmp").write_text("x")
    for staging in ("busy.tmp", "ckpt-000004.tmp"):
        (tmp_path / staging).mkdir()
        (tmp_path / staging / "w.safetensors").write_bytes(b"x")
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.tmp"]
    assert sorted(p.name for p in removed) == [".a.png.4242.tmp", "ckpt-000004.tmp"]  # not the folder that stayed
