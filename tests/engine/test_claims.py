"""Units claimed one at a time from torch.distributed's store: every unit read once, ranks that finish together,
and torchrun restarts that resume from the ledger by themselves."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from torch.distributed import TCPStore

from ramtag.data.ledger import ledger_files, read_ledger_file
from ramtag.engine.claims import StoreClaim
from tests.io_fixtures import image_shard, run_cli

REPO = Path(__file__).resolve().parents[2]
LABELS = ["cat", "dog", "red car", "tree"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # a free port each


@pytest.fixture()
def vocab(tmp_path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def skewed_shards(root: Path, big: int, small: int, count: int) -> list[str]:
    """One shard of ``big`` images first (so that it is claimed first), then ``count`` of ``small``."""
    sizes = [big] + [small] * count
    shards, seed = [], 0
    for index, size in enumerate(sizes):
        keys = [f"s{index}-{i:02d}" for i in range(size)]
        shards.append(str(image_shard(root / f"shard{index}.tar", keys, first_seed=seed)))
        seed += size
    return shards


def rows_by_key(path: Path) -> dict[str, dict]:
    rows = pq.read_table(path).to_pylist()
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), [key for key, n in Counter(keys).items() if n > 1]
    return {row["key"]: row for row in rows}


def assert_same_scores(one: dict[str, dict], other: dict[str, dict]) -> None:
    assert sorted(one) == sorted(other)
    for key, row in one.items():
        assert row["error"] is None and other[key]["error"] is None, (key, row["error"], other[key]["error"])
        np.testing.assert_allclose(other[key]["scores"], row["scores"], rtol=1e-5, atol=1e-5, err_msg=key)


def ledger_lines(work: Path) -> list:
    return [entry for path in ledger_files(work) for entry in read_ledger_file(path)]


def _claim_all(travelled: bytes, results) -> None:
    claim, taken = pickle.loads(travelled), []
    while (index := claim()) is not None:
        taken.append(index)
    results.put(taken)


def test_concurrent_claimers_take_every_unit_exactly_once():
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    claim = StoreClaim("127.0.0.1", server.port, "ramtag/claims/test", 200)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    travelled = pickle.dumps(claim)  # as it reaches a DataLoader worker started by spawn or forkserver
    processes = [context.Process(target=_claim_all, args=(travelled, results)) for _ in range(4)]
    for process in processes:
        process.start()
    taken = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    assert sorted(index for share in taken for index in share) == list(range(200))
    assert claim() is None  # the counter is spent for every later caller too


def test_one_process_with_workers_reads_skewed_units_once(tmp_path, vocab, tiny_checkpoint):
    shards = skewed_shards(tmp_path / "shards", 20, 2, 5)
    out = tmp_path / "tags.parquet"
    assert run_cli("tag", *shards, "--labels", vocab, "-c", tiny_checkpoint, "-o", out, "--workers", 2, "-q") == 0
    assert len(rows_by_key(out)) == 30
    units = Counter(entry.unit for entry in ledger_lines(tmp_path / ".tags.parquet.parts"))
    assert sorted(units) == list(range(6)) and set(units.values()) == {1}


@pytest.mark.slow
def test_two_ranks_claim_skewed_units_once_and_score_as_one_process(tmp_path, vocab, tiny_checkpoint):
    shards = skewed_shards(tmp_path / "shards", 30, 3, 5)  # one shard 10x the others
    common = ["tag", *shards, "--labels", vocab, "-c", tiny_checkpoint, "--all-scores", "--batch-size", 3, "-q"]
    single, double = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert run_cli(*common, "--workers", 0, "-o", single) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # one DataLoader worker per rank: the claims come from worker processes, each with its own store client
    script = rank_script(tmp_path, tmp_path / ".two.parquet.parts", (0.2, 0.2))
    command = [*TORCHRUN, script, *map(str, common), "--workers", "1", "-o", str(double)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_scores(rows_by_key(single), rows_by_key(double))
    entries = ledger_lines(tmp_path / ".two.parquet.parts")
    assert sorted(entry.unit for entry in entries) == list(range(6))  # each unit committed once, by one rank
    per_rank = Counter(entry.rank for entry in entries)
    big_rank = next(entry.rank for entry in entries if entry.unit == 0)
    # the static split gave each rank three units; claimed, the rank that reads the big shard takes fewer
    assert per_rank[big_rank] < per_rank[1 - big_rank], per_rank


RANK_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from ramtag.cli import main
    from ramtag.engine.runtime import Runtime

    work, seconds, kill = Path({work!r}), {seconds!r}, {kill!r}
    rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    real_score = Runtime.score
    calls = [0]

    def score(self, images, features, *rest):  # rest: autocast dtype, compiled vision
        calls[0] += 1
        if attempt == 0:  # a model step as slow as a real one, so that the claims' order shows
            time.sleep(seconds[rank])
        if attempt == 0 and kill and rank == 1 and calls[0] == 3:
            deadline = time.time() + 30  # die holding a unit, once an earlier one is in the ledger
            while not any(path.read_text() for path in work.glob("ledger-*rank001.jsonl")):
                if time.time() > deadline:
                    break
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_score(self, images, features, *rest)

    Runtime.score = score
    main(sys.argv[1:])
    """
)


def rank_script(tmp_path: Path, work: Path, seconds: tuple[float, float], kill: bool = False) -> str:
    """A torchrun script: ``ramtag`` with each rank's model step slowed by ``seconds[rank]`` on the first
    start, and with ``kill``, rank 1 killed (SIGKILL) in the middle of its second unit."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO), work=str(work), seconds=list(seconds), kill=kill))
    return str(script)


@pytest.mark.slow
def test_a_rank_killed_under_max_restarts_heals_to_every_input_once(tmp_path, vocab, tiny_checkpoint):
    shards = skewed_shards(tmp_path / "shards", 2, 2, 7)  # 8 units of 2 images
    common = [
        "tag",
        *shards,
        "--labels",
        vocab,
        "-c",
        tiny_checkpoint,
        "--all-scores",
        "--batch-size",
        1,
        "--workers",
        0,
    ]
    single, double = tmp_path / "one.parquet", tmp_path / "two.parquet"
    assert run_cli(*common, "-q", "-o", single) == 0
    work = tmp_path / ".two.parquet.parts"
    script = rank_script(tmp_path, work, (0.3, 0.0), kill=True)  # rank 0 slow: rank 1 claims most units
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*TORCHRUN, "--max-restarts", "2", script, *map(str, common), "-o", str(double)]
    log = tmp_path / "torchrun.log"  # a file, so that a run past its time limit still shows where it was
    with log.open("w") as sink:
        try:  # about 30 s on 2 cores; the limit leaves room for a loaded machine, and catches a hung restart
            result = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env, timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun did not finish in 150 s:\n{log.read_text()[-3000:]}")
    result.stderr = log.read_text()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ramtag: torchrun restart 1: resuming" in result.stderr, result.stderr[-3000:]
    assert_same_scores(rows_by_key(single), rows_by_key(double))
    entries = ledger_lines(work)
    before_kill = {entry.unit for entry in entries if entry.run == 0}
    assert before_kill and len(before_kill) < 8  # the first start committed some units, not all
    assert sorted(entry.unit for entry in entries) == list(range(8))  # ...and the restart did only the others
