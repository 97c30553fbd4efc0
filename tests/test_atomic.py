"""Atomic writes of checkpoints, training states and vocabulary files: whole files only, with the user's mode."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from ramtag.atomic import atomic_path
from ramtag.data.vocab import save_vocab_features


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o640
    os.umask(previous)


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask_027):
    target = tmp_path / "deep" / "labels.rtv"
    save_vocab_features(target, torch.randn(2, 4), ["cat", "dog"], {"templates": ["{}"], "fingerprint": {}})
    assert stat.S_IMODE(target.stat().st_mode) == umask_027
    assert [path.name for path in target.parent.iterdir()] == ["labels.rtv"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            with open(temporary, "w") as handle:
                handle.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["state.pt"]
