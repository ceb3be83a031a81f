"""latentdiff.files: published files get the umask's mode, failed writes are one sentence, leftovers are recognised."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from latentdiff.files import (WriteError, atomic_dir, atomic_path, atomic_write_text, describe_os_error, file_mode,
                              remove_leftovers, writing)


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
