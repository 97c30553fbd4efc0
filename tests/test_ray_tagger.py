"""ramtag.ray.Tagger: the callable class for Ray Data's map_batches gives what `ramtag tag` gives, row for row."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ramtag.ray import Tagger
from tests.io_fixtures import image_bytes, run_cli

LABELS = ["cat", "dog", "red car", "tree"]



@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_checkpoint):
    """Six images on disk, one broken file, and what `ramtag tag` makes of them."""
    root = tmp_path_factory.mktemp("ray-bench")
    folder = root / "images"
    folder.mkdir()
    data = {f"img{seed}.png": image_bytes(seed) for seed in range(6)}
    data["broken.jpg"] = b"\xff\xd8\xff\xe0 truncated"
    for name, payload in data.items():
        (folder / name).write_bytes(payload)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(LABELS) + "\n")
    out = root / "tags.parquet"
    args = ("--labels", vocab, "-c", tiny_checkpoint, "-o", out, "--workers", 0, "--all-scores", "-q")
    code = run_cli("tag", folder, *args)
    assert code == 3  # the broken file
    rows = {row["key"]: row for row in pq.read_table(out).to_pylist()}
    return data, vocab, rows


def check_against_tag(result: dict, rows: dict) -> None:
    assert sorted(result["key"]) == sorted(rows)
    for index, key in enumerate(result["key"]):
        expected = rows[key]
        if expected["error"] is not None:
            assert result["error"][index] == expected["error"] and list(result["tags"][index]) == []
            continue
        assert result["error"][index] is None
        assert list(result["tags"][index]) == [tag["label"] for tag in expected["tags"]]
        np.testing.assert_allclose(result["scores"][index], expected["scores"], rtol=1e-5, atol=1e-6)


def test_a_batch_of_bytes_is_tagged_as_the_cli_tags_the_files(bench, tiny_checkpoint):
    data, vocab, rows = bench
    tagger = Tagger(str(vocab), checkpoint=str(tiny_checkpoint), device="cpu", all_scores=True, key_column="name")
    batch = {"name": np.array(list(data), dtype=object), "image": np.array(list(data.values()), dtype=object)}
    check_against_tag(tagger(batch), rows)


def test_hugging_face_structs_and_decoded_arrays_are_images_too(bench, tiny_checkpoint):
    data, _, rows = bench
    tagger = Tagger(LABELS, checkpoint=str(tiny_checkpoint), device="cpu", all_scores=True)
    structs = {"image": np.array([{"bytes": payload, "path": name} for name, payload in data.items()], dtype=object)}
    check_against_tag(tagger(structs), rows)

    good = {name: payload for name, payload in data.items() if rows[name]["error"] is None}
    arrays = np.empty(len(good), dtype=object)
    arrays[:] = [np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")) for payload in good.values()]
    decoded = tagger({"image": arrays, "path": np.array(list(good), dtype=object)})
    check_against_tag(decoded, {name: rows[name] for name in good})


def test_rows_without_a_key_are_refused_not_numbered(tiny_checkpoint):
    tagger = Tagger(LABELS, checkpoint=str(tiny_checkpoint), device="cpu")
    with pytest.raises(KeyError, match="key_column"):
        tagger({"image": np.array([image_bytes(0)], dtype=object)})


@pytest.mark.slow
def test_map_batches_on_a_local_ray_matches_the_cli(bench, tiny_checkpoint):
    ray = pytest.importorskip("ray")
    data, vocab, rows = bench
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ds = ray.data.from_items([{"name": name, "image": payload} for name, payload in data.items()])
        tagged = ds.map_batches(
            Tagger,
            fn_constructor_kwargs={
                "labels": str(vocab), "checkpoint": str(tiny_checkpoint), "device": "cpu", "all_scores": True,
                "key_column": "name",
            },
            batch_size=3,
            concurrency=1,
        )  # fmt: skip
        out = tagged.take_all()
    finally:
        ray.shutdown()
    result = {column: [row[column] for row in out] for column in ("key", "tags", "error", "scores")}
    check_against_tag(result, rows)
