"""Output folders that jobs share: which image files belong to which job.

`OUTDIR/jobs.jsonl` records every job — its prompts and each parameter that shapes its images — with the range of
file numbers it owns. A rerun of the same job finds its line and fills exactly its missing files; a different job
gets the next free range; any number of processes may write to one folder at once: the manifest is read and
appended under an exclusive lock, and images are created exclusively (files.create_exclusive_bytes), never replaced.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

MANIFEST = "jobs.jsonl"
LOCK = ".jobs.lock"
_SAMPLE = re.compile(r"(\d+)\.png")


def job_id(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(outdir: Path) -> list[dict]:
    """The recorded jobs; a torn last line (a kill mid-append) is skipped."""
    return _entries(_manifest_text(Path(outdir) / MANIFEST))


def _manifest_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def _entries(text: str) -> list[dict]:
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def claim_range(outdir: Path, spec: dict, count: int) -> int:
    """The first file number of this job: its own range from an earlier run of the same job, else a new range
    after every recorded range and every sample file already in the folder."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        manifest = outdir / MANIFEST
        text = _manifest_text(manifest)  # read once, under the lock
        entries = _entries(text)
        jid = job_id(spec)
        mine = next((e for e in entries if e.get("job") == jid), None)
        if mine is not None:
            return mine["first"]
        samples = outdir / "samples"
        taken = [int(m.group(1)) + 1 for f in (samples.iterdir() if samples.is_dir() else ())
                 if (m := _SAMPLE.fullmatch(f.name))]
        first = max([e["first"] + e["count"] for e in entries] + taken + [0])
        line = json.dumps({"job": jid, "first": first, "count": count, "spec": spec}) + "\n"
        if text and not text.endswith("\n"):
            line = "\n" + line  # end a torn line first, so this one stays whole
        try:
            with open(manifest, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk raises from write() without naming the file
            e.filename = e.filename or str(manifest)
            raise
        return first
