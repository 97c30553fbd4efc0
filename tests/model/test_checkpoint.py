"""Checkpoints: ramtag format round trips, atomic writes, refusal of bad files, reference-format import."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from ramtag.errors import CheckpointError
from ramtag.model.checkpoint import load_checkpoint, model_from_reference_state, save_checkpoint
from ramtag.model.config import RamConfig
from ramtag.model.ram import RamModel
from tests.model_fixtures import images, openai_compatible_clip, tiny_clip, tiny_ram, tokens
from tests.reference_weights import ReferenceSpec, make_reference_images, make_reference_state_dict

SEED = 20


def trained_model(seed: int = SEED, clip=None, **overrides) -> RamModel:
    """A tiny trained-mode model whose every RAM tensor differs from its initial value."""
    model = tiny_ram(seed=seed, clip=clip, train_vocabulary_size=12, **overrides)
    with torch.no_grad():
        model.temperature.fill_(0.02)
        model.temperature_loc.fill_(5e-3)
    return model


def outputs(model: RamModel, label_tokens=None, x=None):
    label_tokens = tokens() if label_tokens is None else label_tokens
    x = images(2, seed=SEED) if x is None else x
    with torch.no_grad():
        return model(x, model.encode_labels(label_tokens))


def assert_same_outputs(first, second):
    for name in ("scores", "global_scores", "local_scores", "similarity", "plan"):
        torch.testing.assert_close(getattr(first, name), getattr(second, name), rtol=0, atol=0, msg=name)


def assert_same_state(first: RamModel, second: RamModel):
    a, b = first.state_dict(), second.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- ramtag format ------------------------------------------------------------------------------------------


def test_round_trip_with_a_given_backbone(tmp_path):
    model = trained_model()
    path = save_checkpoint(tmp_path / "ram.safetensors", model, extra={"epoch": 3})
    loaded = load_checkpoint(path, clip_model=tiny_clip(seed=SEED))
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    assert_same_outputs(outputs(model), outputs(loaded))


def test_round_trip_stores_only_ram_tensors_and_the_config(tmp_path):
    from safetensors import safe_open

    model = trained_model()
    path = save_checkpoint(tmp_path / "ram.safetensors", model, extra={"epoch": 3})
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert keys == set(model.trainable_state_dict())
    assert not any(key.startswith("clip.") for key in keys)
    assert metadata["format"] == "ramtag"
    assert RamConfig.from_dict(json.loads(metadata["config"])) == model.config
    assert json.loads(metadata["extra"]) == {"epoch": 3}


def test_round_trip_applies_config_overrides(tmp_path):
    model = trained_model()
    path = save_checkpoint(tmp_path / "ram.safetensors", model)
    loaded = load_checkpoint(path, config_overrides={"scale_local_temperature": True}, clip_model=tiny_clip(seed=SEED))
    assert loaded.config.scale_local_temperature
    assert not model.config.scale_local_temperature


def test_round_trip_with_the_backbone_included(tmp_path):
    # The backbone travels in the file and rebuilds without a name (OpenAI layout, head width 64). Its weights
    # are float32 values that float16 cannot hold: the rebuilt backbone must be the saved one, not a rounding.
    model = trained_model(clip=openai_compatible_clip(seed=SEED))
    assert any(not torch.equal(t, t.half().float()) for t in model.clip.state_dict().values() if t.is_floating_point())
    path = save_checkpoint(tmp_path / "full.safetensors", model, include_backbone=True)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert_same_state(model, loaded)
    assert_same_outputs(outputs(model), outputs(loaded))


SAVE_ON_A_FULL_DISK = """
import errno, resource, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
from ramtag.model.checkpoint import save_checkpoint
from tests.model.test_checkpoint import trained_model

model = trained_model()
path = save_checkpoint(Path({folder!r}) / "ram.safetensors", model)
before = path.read_bytes()
with torch.no_grad():
    model.temperature.fill_(0.5)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size // 2, resource.RLIM_INFINITY))
try:
    save_checkpoint(path, model)
except OSError as error:
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert error.errno == errno.EFBIG, error  # an OSError with its errno, not a SafetensorError
    assert path.read_bytes() == before  # the previous checkpoint survives intact
    sys.exit(0)
sys.exit(2)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_save_is_atomic_and_a_full_disk_is_an_os_error(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    script = SAVE_ON_A_FULL_DISK.format(repo=str(repo), folder=str(tmp_path))
    # a real refusal by the kernel (the file may not grow past half its size), as a full disk or quota gives
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ram.safetensors"]  # no temporary left behind


# -- bad files --------------------------------------------------------------------------------------------------


def assert_refused(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert "no such" in assert_refused(tmp_path / "absent.safetensors")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("first_byte", [b"", b"\x80", b"PK"])
def test_random_bytes(tmp_path, first_byte):
    gen = torch.Generator().manual_seed(21)
    noise = bytes(torch.randint(0, 256, (2048,), generator=gen, dtype=torch.uint8).tolist())
    path = tmp_path / "noise.bin"
    path.write_bytes(first_byte + noise)
    assert_refused(path)


def test_truncated_safetensors(tmp_path):
    path = save_checkpoint(tmp_path / "ram.safetensors", trained_model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_refused(path, clip_model=tiny_clip(seed=SEED))


def test_safetensors_without_ramtag_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file(trained_model().trainable_state_dict(), str(path))
    assert "ramtag metadata" in assert_refused(path, clip_model=tiny_clip(seed=SEED))


def test_safetensors_whose_header_length_starts_like_a_pickle(tmp_path):
    """The first byte of a safetensors file is its header length's low byte: 0x80 for a 128 + 256k-byte header,
    which is also how a pickle starts. Such a file is still read as safetensors."""
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    tensors = trained_model().trainable_state_dict()
    for padding in range(512):
        save_file(tensors, str(path), metadata={"note": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert "ramtag metadata" in assert_refused(path, clip_model=tiny_clip(seed=SEED))


def test_safetensors_with_a_broken_config(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "broken.safetensors"
    save_file({"temperature": torch.tensor(0.01)}, str(path), metadata={"format": "ramtag", "config": "{not json"})
    assert "config" in assert_refused(path, clip_model=tiny_clip(seed=SEED))


class _Trap:
    """Unpickling this object would create a marker file: a weights-only loader must never do it."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickled_objects_are_refused(tmp_path, writer):
    marker = tmp_path / "executed"
    trap = _Trap()
    trap.marker = marker
    path = tmp_path / "trap.pth"
    payload = {"temperature": torch.tensor(0.01), "payload": trap}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    assert_refused(path)
    assert not marker.exists()


def test_shape_mismatch_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ram.safetensors", trained_model())
    message = assert_refused(path, config_overrides={"adapter_tokens": 5}, clip_model=tiny_clip(seed=SEED))
    assert "vision.adapter_tokens" in message and "shape" in message
    # A backbone of another width makes every adapter tensor mismatch.
    assert_refused(path, clip_model=openai_compatible_clip(seed=SEED))


def test_other_adapter_layers_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "ram.safetensors", trained_model())
    message = assert_refused(path, config_overrides={"adapter_layers": [1, 3]}, clip_model=tiny_clip(seed=SEED))
    assert "missing" in message and "vision.adapters.1" in message
    assert "unexpected" in message and "vision.adapters.2" in message


# -- reference-format import ----------------------------------------------------------------------------------

SMALL_REFERENCE = ReferenceSpec(
    vision_width=64, text_width=64, vocab_size=512, adapter_layers=(10, 11), text_prompt_layers=(11,), adapter_tokens=2,
    prompt_tokens=3, temperature_loc=3e-3, temperature=0.02,
)


@pytest.fixture(scope="module")
def reference_state():
    return make_reference_state_dict(SMALL_REFERENCE, seed=22)


def reference_label_tokens(labels: int = 3) -> torch.Tensor:
    """Token ids for the small vocabulary: start id, a few words, and the end id (the largest, where the text
    encoder pools), then padding, in the reference's 77-token context."""
    vocab = SMALL_REFERENCE.vocab_size
    gen = torch.Generator().manual_seed(24)
    ids = torch.zeros(labels, SMALL_REFERENCE.context_length, dtype=torch.long)
    for row in range(labels):
        words = torch.randint(1, vocab - 2, (4 + row,), generator=gen)
        ids[row, : len(words) + 2] = torch.cat([torch.tensor([vocab - 2]), words, torch.tensor([vocab - 1])])
    return ids


def reference_outputs(model: RamModel):
    model.eval()
    return outputs(model, reference_label_tokens(), make_reference_images(SMALL_REFERENCE, batch=2, seed=23))


@pytest.fixture(scope="module")
def reference_model(reference_state):
    return model_from_reference_state(reference_state).eval()


@pytest.fixture(scope="module")
def reference_expected(reference_model):
    return reference_outputs(reference_model)


def test_reference_import_infers_the_configuration(reference_state, reference_model):
    config = reference_model.config
    assert config.trained and config.pretrained is None
    assert (config.adapter_layers, config.adapter_tokens) == ((10, 11), 2)
    assert (config.prompt_layers, config.prompt_tokens) == ((11,), 3)
    assert config.template == "A photo of a {}."
    pre = config.preprocessing
    assert (pre.image_size, pre.resize, pre.interpolation, pre.mean, pre.std) == (
        32,
        "squash",
        "bilinear",
        (0.5,) * 3,
        (0.5,) * 3,
    )
    assert float(reference_model.temperature.detach()) == pytest.approx(0.02)
    assert float(reference_model.temperature_loc.detach()) == pytest.approx(3e-3)
    assert reference_model.logit_scale == pytest.approx(100.0, rel=1e-6)
    tokens_10 = reference_state["clip_model.visual.transformer.resblocks.10.adapt_embeds"]
    assert torch.equal(reference_model.vision.adapter_tokens["10"], tokens_10)
    prompts_11 = reference_state["clip_model.transformer.resblocks.11.deep_embeds"]
    assert torch.equal(reference_model.text.prompts["11"], prompts_11)


@pytest.mark.parametrize("wrap", ["module", "state_dict"])
def test_reference_file_loads_with_prefix_or_wrapper(tmp_path, reference_state, reference_expected, wrap):
    state = (
        {f"module.{k}": v for k, v in reference_state.items()} if wrap == "module" else {"state_dict": reference_state}
    )
    path = tmp_path / "ram_reference.pth"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert_same_outputs(reference_outputs(loaded), reference_expected)


def test_reference_import_ignores_the_teacher_copy(reference_state, reference_expected):
    scrambled = {
        k: (torch.zeros_like(v) if k.startswith("clip_model_teacher.") else v) for k, v in reference_state.items()
    }
    assert_same_outputs(reference_outputs(model_from_reference_state(scrambled)), reference_expected)


def test_imported_model_round_trips_through_the_ramtag_format(tmp_path, reference_model, reference_expected):
    path = save_checkpoint(tmp_path / "imported.safetensors", reference_model, include_backbone=True)
    loaded = load_checkpoint(path)
    assert loaded.config == reference_model.config
    assert_same_outputs(reference_outputs(loaded), reference_expected)


@pytest.mark.parametrize("dropped", ["temperature", "clip_model.visual.proj", "clip_model.ln_final.weight",
                                     "clip_model.visual.transformer.resblocks.11.conv_adapter.conv_adapter_final.weight"])
def test_reference_dict_missing_keys_is_refused(tmp_path, reference_state, dropped):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in reference_state.items() if k != dropped}, path)
    assert "reference" in assert_refused(path)


def test_reference_file_that_is_not_a_tensor_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    assert "state dict" in assert_refused(path)


def test_included_backbone_that_cannot_be_rebuilt_is_refused(tmp_path):
    # 2 heads of width 32: an OpenAI-format rebuild would infer 1 head of 64 and compute something else.
    model = trained_model(clip=tiny_clip(head_width=32))
    path = tmp_path / "odd-heads.safetensors"
    save_checkpoint(path, model, include_backbone=True)
    message = assert_refused(path)
    assert "cannot be rebuilt" in message
