"""Atomic writes: a reader sees the old file or the whole new one, never a part. Output folders
that refuse a run other than the one that wrote them."""

from __future__ import annotations

import os

import pytest

from leaf_ray.errors import RunRefused
from leaf_ray.files import claim_folder, folder_lock, write_atomically, write_text_atomically


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "export.json"
    write_text_atomically(target, '{"step": 1}\n')

    def crash(tmp):
        tmp.write_text('{"step": 2, "hist')  # a part of the new file, then the writer dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, crash)
    assert target.read_text() == '{"step": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["export.json"]


def test_temp_files_are_named_per_process(tmp_path):
    seen = []
    write_atomically(tmp_path / "a" / "summary.json", lambda tmp: (seen.append(tmp.name), tmp.write_text("x")))
    assert seen == [f".tmp-{os.getpid()}-summary.json"]
    assert (tmp_path / "a" / "summary.json").read_text() == "x"


def test_a_folder_accepts_its_own_run_and_refuses_another(tmp_path):
    claim_folder(tmp_path, {"student": "abc", "pruning": "q=0.1"})
    claim_folder(tmp_path, {"student": "abc", "pruning": "q=0.1"})  # a rerun of the same run: resumes
    with pytest.raises(ValueError, match=r"pruning changed \(q=0.1 -> q=0.2\)") as refused:
        claim_folder(tmp_path, {"student": "abc", "pruning": "q=0.2"})
    assert "student" not in str(refused.value) and "Delete" in str(refused.value)
    with pytest.raises(ValueError, match=r"teacher changed \(None -> t\)"):  # a key the folder never recorded
        claim_folder(tmp_path, {"student": "abc", "pruning": "q=0.1", "teacher": "t"})


def test_a_model_is_fingerprinted_by_content_not_path(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from leaf_ray.models import model_fingerprint
    from tests.conftest import EMBEDDED

    copy = shutil.copytree(EMBEDDED / "student", tmp_path / "moved")
    assert model_fingerprint(copy) == model_fingerprint(EMBEDDED / "student")
    # Retrained: same shapes and file size, every value moved.
    weights = {name: tensor + 1e-3 for name, tensor in load_file(copy / "model.safetensors").items()}
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(copy) != model_fingerprint(EMBEDDED / "student")


def test_a_folder_in_use_refuses_a_second_run_until_its_holder_dies(tmp_path):
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path\n"
                               "from leaf_ray.files import folder_lock\n"
                               f"with folder_lock(Path({str(tmp_path)!r})):\n"
                               "    print('locked', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunRefused, match=rf"in use by another run \(pid {holder.pid} on "):
        with folder_lock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)  # a crash releases the lock: no stale lock to clean up
    holder.wait()
    with folder_lock(tmp_path):
        with pytest.raises(RunRefused, match=rf"pid {os.getpid()} on "):  # one holder, even in one process
            with folder_lock(tmp_path):
                pass
