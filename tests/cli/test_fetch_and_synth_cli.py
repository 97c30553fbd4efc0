"""`ramtag model fetch` (against local files, never the network) and `ramtag data synth`."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.io_fixtures import run_cli

TINY_ARCH = "ramtag-tiny-fetch-test"


@pytest.fixture(scope="module")
def tiny_architecture(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("arch")
    config = {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (folder / f"{TINY_ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    weights = folder / "weights.pt"
    torch.save(open_clip.create_model(TINY_ARCH).state_dict(), weights)
    return weights


def test_fetch_verifies_and_records_a_local_file(tiny_architecture, tmp_path, capsys):
    to = tmp_path / "weights"
    assert run_cli("model", "fetch", TINY_ARCH, "mirror", "--to", to, "--from", tiny_architecture) == 0
    record = json.loads((to / f"{TINY_ARCH}-mirror.json").read_text())
    copied = to / record["file"]
    assert (
        record["sha256"]
        == hashlib.sha256(copied.read_bytes()).hexdigest()
        == hashlib.sha256(tiny_architecture.read_bytes()).hexdigest()
    )
    assert record["sha256"] in capsys.readouterr().out
    # what was fetched is what `--pretrained PATH` loads
    from ramtag.model.weights import load_backbone

    model = load_backbone(TINY_ARCH, str(copied))
    reference = torch.load(tiny_architecture, weights_only=True)
    assert torch.equal(model.state_dict()["visual.proj"], reference["visual.proj"])


def test_fetch_refuses_weights_of_another_architecture(tiny_architecture, tmp_path, capsys):
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    assert run_cli("model", "fetch", TINY_ARCH, "mirror", "--to", tmp_path / "w", "--from", wrong) == 2
    error = capsys.readouterr().err
    assert "wrong.pt" in error and len(error.strip().splitlines()) == 1  # no probing warnings before the line
    assert not (tmp_path / "w" / f"{TINY_ARCH}-mirror.json").exists()
    assert (
        run_cli("model", "fetch", TINY_ARCH, "mirror", "--to", wrong, "--from", tiny_architecture) == 2
    )  # --to a file
    assert "cannot create the folder" in capsys.readouterr().err


def test_training_free_tagging_from_local_weights(tiny_architecture, tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "vocab.txt").write_text("red\nblue\n")
    out = tmp_path / "out.jsonl"
    code = run_cli("tag", tmp_path / "red.png", "--labels", tmp_path / "vocab.txt", "--model", TINY_ARCH,
                   "--pretrained", tiny_architecture, "-o", out, "--workers", 0)
    assert code == 0
    row = json.loads(out.read_text())
    assert row["error"] is None and {t["label"] for t in row["tags"]} == {"red", "blue"}


def test_data_synth_command_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert (
            run_cli("data", "synth", tmp_path / name, "--n", 6, "--seed", 5, "--format", "images", "--format", "json")
            == 0
        )
    first = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert first and first == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for relative in first:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()
    labels = json.loads((tmp_path / "a" / "labels.json").read_text())
    assert len(labels["images"]) == 6


def test_data_synth_refuses_to_mix_two_datasets_in_one_folder(tmp_path, capsys):
    out = tmp_path / "synth"
    assert run_cli("data", "synth", out, "--n", 6, "--seed", 5, "--format", "images", "--format", "json") == 0
    (out / "NOTES.md").write_text("mine")
    assert run_cli("data", "synth", out, "--n", 2, "--seed", 6, "--format", "images", "--format", "json") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert len(list((out / "images").iterdir())) == 6
    assert (
        run_cli("data", "synth", out, "--n", 2, "--seed", 6, "--format", "images", "--format", "json", "--overwrite")
        == 0
    )
    assert len(list((out / "images").iterdir())) == 2  # the six earlier images are gone, not mixed in
    assert len(json.loads((out / "labels.json").read_text())["images"]) == 2
    assert (out / "NOTES.md").read_text() == "mine"  # files it did not write stay
    assert run_cli("data", "synth", out / "labels.json", "--n", 1) == 2  # a file, not a folder: one line, no traceback
    assert run_cli("data", "synth", tmp_path / "big", "--n", 1, "--image-size", 100000) == 2


def test_no_network_names_the_ways_out(monkeypatch, tmp_path, capsys):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': Failed to download file (x.bin)")

    monkeypatch.setattr(open_clip, "create_model", offline)
    (tmp_path / "v.txt").write_text("cat\n")
    assert run_cli("tag", tmp_path, "--labels", tmp_path / "v.txt", "-o", tmp_path / "o.jsonl") == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said[0] == "ramtag: loading ViT-B-16-quickgelu / openai …"  # said first, not after a silent minute
    error = said[1:]
    assert (
        len(error) == 1
        and "--pretrained" in error[0]
        and "--model demo" in error[0]
        and "ramtag model fetch" in error[0]
    )


def test_download_retries_are_not_logged_when_the_download_fails_but_are_when_it_works():
    import logging

    from ramtag.model.weights import logs_held_unless_it_fails

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    hub = logging.getLogger("huggingface_hub")
    collect = Collect()
    hub.addHandler(collect)
    try:
        with pytest.raises(RuntimeError):
            with logs_held_unless_it_fails():
                logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
                raise RuntimeError("Failed to download")
        assert seen == []  # the caller reports the failure in one line
        with logs_held_unless_it_fails():
            logging.getLogger("huggingface_hub.utils._http").warning("a warning worth keeping")
        assert seen == ["a warning worth keeping"]
    finally:
        hub.removeHandler(collect)


def test_data_synth_names_each_file_it_wrote_and_what_it_is_for(tmp_path, capsys):
    from ramtag.cli.data import SYNTH_FILE_PURPOSES

    assert run_cli("data", "synth", tmp_path / "s", "--n", 4, "--format", "json", "--format", "jsonl") == 0
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("ramtag: ") for line in err)
    lines = [line.removeprefix("ramtag: ") for line in err[1:]]
    assert "  labels.json, seen.json, unseen.json: " + SYNTH_FILE_PURPOSES["json"] in lines
    assert "  manifest.jsonl: " + SYNTH_FILE_PURPOSES["jsonl"] in lines
    named = [line.split(": ")[0].strip().split(" (")[0].split(", ")[0] for line in lines]
    assert "images/" in named and all((tmp_path / "s" / name).exists() for name in named)
