"""`ramtag explain` and `ramtag tag --save-maps`: valid PNGs of the expected size, maps that are distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ramtag.engine.explain import CAPTION, PANEL, region_maps, safe_file_name
from tests.io_fixtures import run_cli


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (30 + index, 40, 3), dtype=np.uint8)).save(tmp_path / f"p{index}.png")
    (tmp_path / "vocab.txt").write_text("cat\ndog\ncar\ntree\n")
    return tmp_path


def test_explain_writes_one_sheet_per_image(folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "maps"
    assert (
        run_cli(
            "explain",
            *sorted(folder.glob("p*.png")),
            "--labels",
            folder / "vocab.txt",
            "-c",
            tiny_checkpoint,
            "-o",
            out,
            "-k",
            2,
        )
        == 0
    )
    sheets = sorted(out.glob("*.png"))
    assert len(sheets) == 3
    for sheet in sheets:
        with Image.open(sheet) as picture:
            picture.verify()
        with Image.open(sheet) as picture:
            assert picture.size == (PANEL * 3, PANEL + CAPTION)  # the image and two maps


def test_tag_can_save_maps(folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "maps"
    assert (
        run_cli(
            "tag",
            folder,
            "--labels",
            folder / "vocab.txt",
            "-c",
            tiny_checkpoint,
            "-o",
            tmp_path / "t.jsonl",
            "--save-maps",
            out,
            "-k",
            1,
            "--workers",
            0,
        )
        == 0
    )
    assert len(list(out.glob("*.png"))) == 3


def test_region_maps_are_the_plan_columns_normalised():
    plan = torch.rand(2, 16, 5)
    from ramtag.model.ram import RamOutput

    output = RamOutput(
        *(torch.zeros(2, 5),) * 5,
        similarity=torch.zeros(2, 16, 5),
        plan=plan,
        region_marginal=torch.zeros(2, 16),
        sinkhorn_iterations=1,
    )
    maps = region_maps(output, torch.tensor([[3, 0], [1, 1]]))
    assert maps.shape == (2, 2, 4, 4)
    torch.testing.assert_close(maps.flatten(2).sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(maps[0, 0].flatten(), plan[0, :, 3] / plan[0, :, 3].sum())


@pytest.mark.parametrize("key", ["../../etc/passwd", "/abs/path.png", "shard.tar/..\\x", "", "ü ñ.jpg"])
def test_file_names_from_keys_never_escape_the_folder(key):
    name = safe_file_name(key)
    assert "/" not in name and "\\" not in name and not name.startswith(".") and name.endswith(".png")
    assert safe_file_name(key) != safe_file_name(key + "x")


def test_tag_refuses_a_maps_folder_it_cannot_write_before_tagging(folder, tiny_checkpoint, tmp_path, capsys):
    place = tmp_path / "out"
    place.mkdir()
    blocker = place / "a-file"
    blocker.write_text("not a folder")
    out = place / "t.parquet"
    code = run_cli(
        "tag",
        folder,
        "--labels",
        folder / "vocab.txt",
        "-c",
        tiny_checkpoint,
        "-o",
        out,
        "--save-maps",
        blocker / "maps",
        "--workers",
        0,
    )
    assert code == 2
    message = capsys.readouterr().err
    assert "cannot write region maps" in message and "Traceback" not in message
    assert sorted(path.name for path in place.iterdir()) == ["a-file"]  # no output and no parts were started
