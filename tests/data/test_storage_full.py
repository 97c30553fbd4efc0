"""A full disk (or quota, or file size limit) stops a run with one line and exit 4, keeping what it committed.

The storage's refusal is real: the child process lowers its own file size limit (RLIMIT_FSIZE, with SIGXFSZ
ignored), so every write that would grow a file fails with EFBIG, as ENOSPC does on a full disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ramtag.data.ledger import latest_entries
from ramtag.errors import EXIT_STORAGE_FULL
from tests.data.test_ledger import LABELS, photo_folder, tag

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")


@pytest.fixture
def vocab(tmp_path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


FULL_MID_RUN = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from ramtag.engine.runtime import Runtime, load_runtime
    from ramtag.engine.tag import TagOptions, run_tag
    from ramtag.errors import RamtagError

    work = Path({work!r})
    real_score = Runtime.score

    def committed_lines():
        return sum(path.read_text().count("\\n") for path in work.glob("ledger-*.jsonl"))

    def score_until_the_disk_fills(self, images, features, *rest):  # rest: autocast dtype, compiled vision
        if committed_lines() >= 2:  # two units are committed: from now on no file may grow
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        return real_score(self, images, features, *rest)

    Runtime.score = score_until_the_disk_fills
    runtime = load_runtime({checkpoint!r}, device="cpu")
    options = TagOptions(inputs=[{folder!r}], labels={vocab!r}, output={out!r}, workers=0, batch_size=1,
                         unit_rows=2, part_rows=1, quiet=True)
    try:
        run_tag(options, runtime)
    except RamtagError as error:
        print(f"ramtag: error: {{error}}", file=sys.stderr)
        sys.exit(error.exit_code)
    """
)


def test_a_disk_that_fills_mid_run_stops_it_with_status_4_and_resume_finishes(tmp_path, vocab, tiny_checkpoint):
    folder = photo_folder(tmp_path / "photos", 9)
    out = tmp_path / "tags.parquet"
    work = tmp_path / ".tags.parquet.parts"
    script = FULL_MID_RUN.format(
        repo=str(REPO),
        work=str(work),
        checkpoint=str(tiny_checkpoint),
        folder=str(folder),
        vocab=str(vocab),
        out=str(out),
    )
    env = {**os.environ, "RAMTAG_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == EXIT_STORAGE_FULL, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("--resume (a file output; -o - cannot be resumed)")
    assert "File too large" in result.stderr
    committed = latest_entries(work)
    assert 2 <= len(committed) < 5 and not out.exists()

    assert tag(folder, vocab, tiny_checkpoint, out, "--resume", "--batch-size", 1) == 0
    keys = pq.read_table(out, columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == [f"img{i:03d}.png" for i in range(9)]  # every input once
    assert all(latest_entries(work)[unit].run == 0 for unit in committed)  # units committed before are kept


def test_a_disk_full_before_the_first_row_is_one_line_and_status_4(tmp_path, vocab):
    # nothing can be written: not the label feature cache (skipped: a cache), not the plan of the run
    folder = photo_folder(tmp_path / "photos", 3)
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import open_clip, torch  # torch's import itself needs a writable temporary folder
        from ramtag.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
        main(["tag", {str(folder)!r}, "-l", {str(vocab)!r}, "--model", "demo", "-o", {str(tmp_path / "t.parquet")!r},
              "--workers", "0", "--quiet"])
        """
    )
    env = {**os.environ, "RAMTAG_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == EXIT_STORAGE_FULL, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("ramtag: error:")]
    assert len(lines) == 1 and "File too large" in lines[0] and "Traceback" not in result.stderr
