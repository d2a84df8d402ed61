"""Atomic writes: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import os

import pytest

from leaf_ray.files import write_atomically, write_text_atomically


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
