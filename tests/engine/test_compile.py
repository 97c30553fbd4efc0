"""`--compile`: the compiled image forward gives the eager scores, one graph serves the smaller last batch, and a
compiler that fails costs one warning, never the run.

Measured on the CPU (inductor, fp32): the compiled scores differ from the eager ones by at most 1.0e-6 on the tiny
RAM with adapters and 3e-7 on the demo model (scores are probabilities, at most 1). The bound below,
COMPILED_SCORE_TOLERANCE, is ten times the larger: inductor fuses and reorders fp32 sums, so equality to the last
bit is not to be had, while any real fault (a padded row leaking into a real one, a wrong slice) moves scores by
orders of magnitude more. Compiling on a CPU takes 5 to 30 s per model here, so the two tests that compile are slow.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ramtag.cli.options import ModelChoice
from ramtag.engine.compiled import CompiledVision
from tests import model_fixtures as mf
from tests.io_fixtures import run_cli, write_image

COMPILED_SCORE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def demo_runtime():
    from ramtag.engine.runtime import load_runtime

    return load_runtime(model="demo", device="cpu")


@pytest.fixture()
def demo(demo_runtime, monkeypatch):
    """`--model demo`, loaded once, with no compiled forward left over from another test."""
    monkeypatch.setattr(ModelChoice, "load", lambda self: demo_runtime)
    demo_runtime._compiled.clear()
    yield demo_runtime
    demo_runtime._compiled.clear()


@pytest.fixture()
def photos(tmp_path):
    root = tmp_path / "photos"
    for index in range(7):  # batches of 3: 3, 3 and a last one of 1
        write_image(root / f"p{index}.png", seed=index)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red\ngreen\nblue\nsquare\ncircle\n")
    return root, vocab


def _scores(path) -> dict[str, np.ndarray]:
    return {row["key"]: np.array(row["scores"]) for row in map(json.loads, path.read_text().splitlines())}


def _tags(path) -> dict[str, list[str]]:
    return {row["key"]: [t["label"] for t in row["tags"]] for row in map(json.loads, path.read_text().splitlines())}


def _tag(root, vocab, out, *extra) -> int:
    return run_cli(
        "tag", root, "--labels", vocab, "--model", "demo", "-o", out, "--workers", 0, "--all-scores", "-b", 3, *extra
    )


def test_smaller_batches_are_padded_into_one_graph_and_keep_their_scores():
    # dynamo's own backend: the graph count and the padding are what this checks, in seconds (see below).
    from torch._dynamo.utils import counters

    model = mf.tiny_ram(0)  # trained mode: adapters at layers 2 and 3 attend to the label features
    features = model.encode_labels(mf.tokens())
    images = mf.images(4, seed=1)
    said = []
    compiled = CompiledVision(model.vision, batch_size=4, say=said.append, backend="eager")
    graphs_before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for count in (4, 3, 1, 4):
            eager = model(images[:count], features)
            fast = model(images[:count], features, vision=compiled)
            assert fast.scores.shape == eager.scores.shape
            assert (fast.scores - eager.scores).abs().max().item() <= COMPILED_SCORE_TOLERANCE
            assert torch.equal(fast.scores.argmax(-1), eager.scores.argmax(-1))
    assert counters["stats"]["unique_graphs"] - graphs_before == 1  # the padded batches reused the one graph
    assert compiled.failure is None and compiled.compile_seconds is not None
    assert len(said) == 1 and "compiled the image forward for batches of 4" in said[0]


def test_tag_with_compile_writes_the_eager_scores_and_tags(photos, demo, tmp_path, capsys, monkeypatch):
    # dynamo's eager backend: the CLI's wiring (one graph, padding, the message, equal rows) in seconds, where a
    # cold inductor compile costs this machine 30-40 s. Inductor's own numerics are measured by
    # benchmarks/tag_throughput.py --compile (1e-6 on the CPU) and checked on a device by tests/test_cuda.py.
    from ramtag.engine.runtime import Runtime

    compiled_vision = Runtime.compiled_vision
    monkeypatch.setattr(
        Runtime, "compiled_vision", lambda self, size, say, backend="": compiled_vision(self, size, say, "eager")
    )
    root, vocab = photos
    assert _tag(root, vocab, tmp_path / "eager.jsonl") == 0
    assert _tag(root, vocab, tmp_path / "compiled.jsonl", "--compile") == 0
    err = capsys.readouterr().err
    assert "warning" not in err and err.count("compiled the image forward for batches of 3") == 1
    eager, compiled = _scores(tmp_path / "eager.jsonl"), _scores(tmp_path / "compiled.jsonl")
    assert eager.keys() == compiled.keys() and len(eager) == 7
    assert max(np.abs(eager[key] - compiled[key]).max() for key in eager) <= COMPILED_SCORE_TOLERANCE
    assert _tags(tmp_path / "eager.jsonl") == _tags(tmp_path / "compiled.jsonl")


def _failing_compile(error: Exception):
    def compile_(module, **options):
        def run(*args, **kwargs):
            raise error

        return run

    return compile_


@pytest.mark.parametrize(
    "fault",
    ["at the first batch", "in torch.compile itself"],
)
def test_a_compiler_that_fails_costs_one_warning_and_the_run_goes_on_eager(
    photos, demo, tmp_path, capsys, monkeypatch, fault
):
    root, vocab = photos
    assert _tag(root, vocab, tmp_path / "eager.jsonl") == 0
    error = RuntimeError("InductorError: CppCompileError: C++ compile error\nno compiler found")
    if fault == "at the first batch":
        monkeypatch.setattr(torch, "compile", _failing_compile(error))
    else:
        monkeypatch.setattr(torch, "compile", lambda module, **options: (_ for _ in ()).throw(error))
    assert _tag(root, vocab, tmp_path / "fallback.jsonl", "--compile") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "ramtag: warning: --compile: torch.compile failed (RuntimeError: InductorError: CppCompileError: C++ compile "
        "error); running uncompiled"
    ]
    eager, fallback = _scores(tmp_path / "eager.jsonl"), _scores(tmp_path / "fallback.jsonl")
    assert eager.keys() == fallback.keys() and all(np.array_equal(eager[k], fallback[k]) for k in eager)


def test_out_of_memory_in_the_compiled_forward_names_the_batch_size(photos, demo, tmp_path, capsys, monkeypatch):
    root, vocab = photos
    monkeypatch.setattr(torch, "compile", _failing_compile(torch.OutOfMemoryError("CUDA out of memory")))
    assert _tag(root, vocab, tmp_path / "t.jsonl", "--compile") == 2
    err = capsys.readouterr().err
    assert "ran out of memory at 3 images per batch" in err and "torch.compile failed" not in err


def test_compile_with_ray_is_refused_before_the_model_loads(photos, tmp_path, capsys, monkeypatch):
    def load(self):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(ModelChoice, "load", load)
    root, vocab = photos
    assert _tag(root, vocab, tmp_path / "t.jsonl", "--compile", "--ray", "local") == 2
    assert "--compile works without --ray only" in capsys.readouterr().err


def test_a_run_shorter_than_a_batch_compiles_for_its_own_size(photos, demo, tmp_path, capsys, monkeypatch):
    root, vocab = photos
    monkeypatch.setattr(torch, "compile", lambda module, **options: module)  # what is compiled, not how
    assert (
        run_cli(
            "tag",
            root,
            "--labels",
            vocab,
            "--model",
            "demo",
            "-o",
            tmp_path / "t.jsonl",
            "-b",
            32,
            "--workers",
            0,
            "--compile",
        )
        == 0
    )
    assert "compiled the image forward for batches of 7 " in capsys.readouterr().err  # 7 photos, not 32
