"""files.py: atomic writes (temp file + rename), folder publishing, durability (fsync) and the file hash."""
import errno
import hashlib
import os
import shutil

import pytest
from helpers import file_size_limit

from latentdiff import files


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync call, by what it synced: 'file' or 'dir'."""
    calls = []
    real = os.fsync

    def spy(fd):
        calls.append("dir" if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_atomic_write_bytes_writes_the_bytes_and_leaves_no_temporary_file(tmp_path, fsyncs):
    files.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01payload")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01payload"
    files.atomic_write_bytes(str(tmp_path / "a.bin"), b"new")  # replaces, and takes str paths
    assert (tmp_path / "a.bin").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    assert fsyncs == []  # not durable by default: a kill is survived, a power cut need not be


def test_a_write_failing_in_write_keeps_the_old_file_and_names_the_target(tmp_path):
    """A full disk (here a file-size limit) fails inside write(), an error with no file name: it gets the target's."""
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError) as info, file_size_limit(64):
        files.atomic_write_bytes(target, b"x" * 1000)
    assert info.value.errno == errno.EFBIG and info.value.filename == str(target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_an_error_about_the_temporary_names_the_target_and_one_about_another_file_keeps_its_name(tmp_path):
    target = tmp_path / "missing" / "a.bin"
    with pytest.raises(FileNotFoundError) as info:
        files.atomic_write_bytes(target, b"x")
    assert info.value.filename == str(target)  # not the `.a.bin.PID.tmp` nobody asked for
    source = tmp_path / "no-such-source"
    with pytest.raises(FileNotFoundError) as info, files.atomic_path(tmp_path / "b.bin") as tmp:
        shutil.copyfile(source, tmp)
    assert info.value.filename == str(source)
    assert list(tmp_path.iterdir()) == []


def test_create_exclusive_bytes_writes_a_new_file_but_never_replaces_one(tmp_path):
    target = tmp_path / "00000.png"
    files.create_exclusive_bytes(str(target), b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(FileExistsError) as info:
        files.create_exclusive_bytes(target, b"second")
    assert info.value.filename == str(target) and target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["00000.png"]  # the temporary is gone, after success or failure
    with pytest.raises(FileNotFoundError) as info:  # nothing was written: the error is about the file, not its cleanup
        files.create_exclusive_bytes(tmp_path / "missing" / "a.png", b"x")
    assert info.value.filename == str(tmp_path / "missing" / "a.png")


def test_durable_writes_fsync_the_file_and_its_folder(tmp_path, fsyncs):
    files.atomic_write_bytes(tmp_path / "a.bin", b"x", durable=True)
    assert fsyncs == ["file", "dir"]
    fsyncs.clear()
    files.atomic_write_text(tmp_path / "a.txt", "x", durable=True)
    assert fsyncs == ["file", "dir"]
    fsyncs.clear()
    files.atomic_write_text(tmp_path / "b.txt", "x")
    assert fsyncs == []


def test_atomic_write_text_is_utf8(tmp_path):
    files.atomic_write_text(tmp_path / "t.txt", "prompt: é ✓ 猫\n")
    assert (tmp_path / "t.txt").read_bytes() == "prompt: é ✓ 猫\n".encode("utf-8")


def test_fsync_dir_closes_its_descriptor(tmp_path, fsyncs):
    before = open_fds()
    for _ in range(5):
        files._fsync_dir(tmp_path)
    assert open_fds() == before
    assert fsyncs == ["dir"] * 5


def test_staging_dir_is_a_fixed_twin_beside_the_folder(tmp_path):
    assert files.staging_dir(tmp_path / "model") == tmp_path / "model.tmp"
    assert files.staging_dir(str(tmp_path / "run" / "ckpt-000010")) == tmp_path / "run" / "ckpt-000010.tmp"


def make_tree(root, content):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(content)
    (root / "sub" / "b.txt").write_text(content * 2)


def test_publish_dir_moves_a_new_folder_into_place(tmp_path, fsyncs):
    tmp, folder = tmp_path / "model.tmp", tmp_path / "model"
    make_tree(tmp, "new")
    files.publish_dir(str(tmp), str(folder))
    assert (folder / "a.txt").read_text() == "new" and (folder / "sub" / "b.txt").read_text() == "newnew"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert fsyncs == ["file", "file", "dir"]  # every file reaches the disk, then the rename does


@pytest.mark.parametrize("stray_old", [False, True])
def test_publish_dir_replaces_an_existing_folder_and_clears_a_stray_old_one(tmp_path, fsyncs, stray_old):
    tmp, folder = tmp_path / "model.tmp", tmp_path / "model"
    make_tree(folder, "old")
    if stray_old:
        make_tree(tmp_path / "model.old", "left by a publish killed mid-swap")
    make_tree(tmp, "new")
    files.publish_dir(tmp, folder)
    assert (folder / "a.txt").read_text() == "new" and (folder / "sub" / "b.txt").read_text() == "newnew"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert fsyncs == ["file", "file", "dir"]


def test_atomic_dir_publishes_only_a_completed_block(tmp_path):
    folder = tmp_path / "out"
    with files.atomic_dir(folder) as tmp:
        (tmp / "x").write_text("1")
    assert (folder / "x").read_text() == "1"
    with pytest.raises(RuntimeError):
        with files.atomic_dir(folder) as tmp:
            (tmp / "x").write_text("2")
            raise RuntimeError("killed")
    assert (folder / "x").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_file_sha256_reads_in_bounded_chunks(tmp_path, monkeypatch):
    """Checkpoints are gigabytes: the hash streams them instead of reading a file at once."""
    (tmp_path / "f").write_bytes(b"\x01" * (5 << 20))
    sizes, real_open = [], open

    class Reader:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            sizes.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(files, "open", lambda *a, **k: Reader(real_open(*a, **k)), raising=False)
    assert files.file_sha256(tmp_path / "f") == hashlib.sha256(b"\x01" * (5 << 20)).hexdigest()
    assert len(sizes) >= 3 and all(n is not None and 0 < n <= 4 << 20 for n in sizes)


@pytest.mark.parametrize("size", [0, 5, (1 << 20) - 1, (1 << 20) + 12345, 3 << 20])
def test_file_sha256_matches_hashlib_across_chunk_boundaries(tmp_path, size):
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    (tmp_path / "f").write_bytes(data)
    assert files.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert files.file_sha256(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()
