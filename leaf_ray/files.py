"""Writing a file so that a reader (a rerun, a resume, another stage) never sees part of it."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from leaf_ray.errors import RunRefused


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temp file beside ``path``, named for this process so that two
    writers never share one; it is fsynced, then renamed over ``path`` (and the rename
    fsynced), so ``path`` is the old file or the whole new one, even after a crash. A write
    that fails leaves no temp file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def claim_folder(folder: Path, fingerprint: dict[str, Any]) -> None:
    """Record in ``folder/fingerprint.json`` what writes the folder; when it already holds the
    output of something else (any key differs), refuse, naming each change: resuming would
    silently mix the two runs' results."""
    path = folder / "fingerprint.json"
    if not path.exists():
        write_text_atomically(path, json.dumps(fingerprint, indent=2) + "\n")
        return
    recorded = json.loads(path.read_text())
    changed = [f"{key} changed ({recorded.get(key)} -> {value})" for key, value in fingerprint.items()
               if recorded.get(key) != value]
    if changed:
        raise RunRefused(f"{folder} holds the output of another run ({'; '.join(changed)}): resuming it would mix "
                         f"the two. Delete {folder} to start over, or write this run elsewhere (run_dir).")


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` (an flock: released when the holder exits, however it exits) while a
    run writes the folder; a second run on the same folder refuses at once instead of deleting
    the first one's in-flight parts as leftovers."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunRefused(f"{folder} is in use by another run ({holder}): wait for it to finish, "
                               "or write this run elsewhere (run_dir)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
