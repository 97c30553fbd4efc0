"""ramtag.data.annotations on the reference's real COCO split files and on small generated files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ramtag.data.annotations import (
    LabelledImage,
    PathResolver,
    PrefixMapping,
    parse_prefix_mapping,
    read_annotations,
)
from ramtag.errors import DataError

REFERENCE_DIR = Path("/work/shared/data/reference-annotations")
ZSL_FILE = REFERENCE_DIR / "coco_test_17_filtered.json"  # 17 unseen COCO labels
GZSL_FILE = REFERENCE_DIR / "coco_test_65_filtered.json"  # 48 seen + 17 unseen
REFERENCE_PREFIX = "/mnt/nas/TrueNas1/tanhao/COCO/trainval2014"
needs_reference_files = pytest.mark.skipif(not ZSL_FILE.exists(), reason="reference split files not present")


def _raw(path: Path) -> dict:
    return json.loads(path.read_text())


@needs_reference_files
@pytest.mark.parametrize(("path", "n_classes"), [(ZSL_FILE, 17), (GZSL_FILE, 65)])
def test_reference_split_counts_and_dedupe(path: Path, n_classes: int) -> None:
    raw = _raw(path)
    data = read_annotations(path)
    assert data.format == "reference"
    assert len(data) == len(raw["images"]) > 1000
    assert data.classes == tuple(raw["classes"]) and len(data.classes) == n_classes
    assert any(len(set(labels)) < len(labels) for _, labels in raw["images"])  # instances repeat labels
    for image, (raw_path, raw_labels) in zip(data.images, raw["images"]):
        assert image.path == raw_path
        assert image.labels == tuple(dict.fromkeys(raw_labels))
    assert {label for image in data.images for label in image.labels} == set(data.classes)


@needs_reference_files
def test_reference_paths_mapped_onto_a_local_root() -> None:
    data = read_annotations(
        ZSL_FILE, format="reference", root="/data/coco/val2014", prefix_map=[f"{REFERENCE_PREFIX}="]
    )
    raw = _raw(ZSL_FILE)
    assert all(image.path.startswith("/data/coco/val2014/COCO_val2014_") for image in data.images)
    assert [Path(image.path).name for image in data.images] == [Path(p).name for p, _ in raw["images"]]
    swapped = read_annotations(ZSL_FILE, format="reference", prefix_map=["/mnt/nas=/srv/nas"])
    assert swapped.images[0].path == raw["images"][0][0].replace("/mnt/nas/", "/srv/nas/", 1)


@needs_reference_files
def test_the_zsl_split_is_the_gzsl_split_restricted_to_unseen_labels() -> None:
    from ramtag.data.labelled import open_labelled_source
    from ramtag.data.labelled_samples import check_strict_labels

    gzsl, zsl = read_annotations(GZSL_FILE), read_annotations(ZSL_FILE)
    unseen = set(zsl.classes)
    seen = set(gzsl.classes) - unseen
    assert len(seen) == 48
    # the reference's ZSL split is exactly the GZSL images that keep an unseen label
    kept = {(image.path, frozenset(set(image.labels) & unseen)) for image in gzsl.images if set(image.labels) & unseen}
    assert kept == {(image.path, frozenset(image.labels)) for image in zsl.images}
    with pytest.raises(DataError, match="48 label\\(s\\) outside the label space"):
        check_strict_labels(open_labelled_source(str(GZSL_FILE)).items, zsl.classes, "gzsl")


def test_prefix_mapping_respects_path_boundaries_and_longest_match() -> None:
    mapped = PathResolver(None, ["/mnt/nas=/data", "/mnt/nas/coco/=/fast/coco"])
    assert mapped("/mnt/nas/x/a.jpg") == "/data/x/a.jpg"
    assert mapped("/mnt/nas/coco/a.jpg") == "/fast/coco/a.jpg"
    assert mapped("/mnt/nasty/a.jpg") == "/mnt/nasty/a.jpg"
    assert PathResolver("/r", ["/mnt/nas="])("/mnt/nas/x/a.jpg") == "/r/x/a.jpg"
    assert PathResolver("/r", ())("rel/a.jpg") == "/r/rel/a.jpg"
    assert PathResolver("/r", ())("/abs/a.jpg") == "/abs/a.jpg"
    assert parse_prefix_mapping("a=b=c") == PrefixMapping("a", "b=c")
    for bad in ("no-separator", "=new"):
        with pytest.raises(DataError, match="OLD=NEW"):
            parse_prefix_mapping(bad)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_manifest_with_root_and_dedupe(tmp_path: Path) -> None:
    manifest = _write_lines(
        tmp_path / "train.jsonl",
        [
            json.dumps({"image": "a.jpg", "labels": ["cat", "dog", "cat"]}),
            "",
            json.dumps({"image": "/abs/b.jpg", "labels": []}),
            json.dumps({"image": "sub/c.png", "labels": [" dog "], "extra": 1}),
        ],
    )
    data = read_annotations(manifest, format="jsonl", root=tmp_path)
    assert data.images == [
        LabelledImage(str(tmp_path / "a.jpg"), ("cat", "dog")),
        LabelledImage("/abs/b.jpg", ()),
        LabelledImage(str(tmp_path / "sub/c.png"), ("dog",)),
    ]
    assert data.classes is None


def test_jsonl_bad_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    manifest = _write_lines(
        tmp_path / "m.jsonl",
        [
            json.dumps({"image": "a.jpg", "labels": ["cat"]}),
            "{not json",
            json.dumps({"image": "b.jpg"}),
            json.dumps({"image": "c.jpg", "labels": "cat"}),
            json.dumps({"image": "d.jpg", "labels": ["dog"]}),
        ],
    )
    with pytest.raises(DataError) as error:
        read_annotations(manifest)
    message = str(error.value)
    assert "3 bad line(s)" in message
    assert all(f"{manifest}:{line}:" in message for line in (2, 3, 4))
    skipped = read_annotations(manifest, on_error="skip")
    assert [image.path for image in skipped.images] == ["a.jpg", "d.jpg"]
    assert [entry.split(": ")[0] for entry in skipped.skipped] == [f"{manifest}:{n}" for n in (2, 3, 4)]


def _coco_document() -> dict:
    return {
        "images": [
            {"id": 10, "file_name": "000010.jpg"},
            {"id": 11, "file_name": "000011.jpg"},
            {"id": 12, "file_name": "000012.jpg"},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3},
            {"id": 2, "image_id": 10, "category_id": 1},
            {"id": 3, "image_id": 10, "category_id": 3},
            {"id": 4, "image_id": 12, "category_id": 7},
        ],
    }


def test_coco_instances_names_labels_by_category(tmp_path: Path) -> None:
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(_coco_document()))
    data = read_annotations(path, root="/coco/val2017")
    assert data.format == "coco"
    assert data.classes == ("person", "car", "dog")
    assert data.images == [
        LabelledImage("/coco/val2017/000010.jpg", ("car", "person")),
        LabelledImage("/coco/val2017/000011.jpg", ()),  # no objects: negative for every class
        LabelledImage("/coco/val2017/000012.jpg", ("dog",)),
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["annotations"].append({"image_id": 99, "category_id": 1}),
            "annotations\\[4\\]: unknown image_id 99",
        ),
        (
            lambda d: d["annotations"].append({"image_id": 10, "category_id": 2}),
            "annotations\\[4\\]: unknown category_id 2",
        ),
        (
            lambda d: d["images"].append({"id": 10, "file_name": "x.jpg"}),
            "images\\[3\\]: repeats image id 10",
        ),
        (lambda d: d["images"].append({"id": 13}), "images\\[3\\]: image path"),
        (lambda d: d.pop("categories"), "looks like COCO instances but has no 'categories' list"),
    ],
)
def test_coco_errors_name_the_file_and_entry(tmp_path: Path, edit, message: str) -> None:
    document = _coco_document()
    edit(document)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=f"bad.json: {message}"):
        read_annotations(path)


def test_format_detected_from_content_whatever_the_extension(tmp_path: Path) -> None:
    reference = tmp_path / "split.txt"
    reference.write_text(json.dumps({"images": [["x.jpg", ["a", "a"]]]}))
    lines = _write_lines(tmp_path / "list.txt", [json.dumps({"image": "x.jpg", "labels": ["a"]})] * 2)
    coco = tmp_path / "coco.data"
    coco.write_text(json.dumps(_coco_document()))
    assert [read_annotations(p).format for p in (reference, lines, coco)] == ["reference", "jsonl", "coco"]
    assert read_annotations(reference).images == [LabelledImage("x.jpg", ("a",))]
    assert read_annotations(reference).classes is None
    assert len(read_annotations(lines)) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"images": [["a.jpg", ["x"]],\n  ["b.jpg" ["y"]]]}', ":2:12: invalid JSON"),
        ('{"images": []}', "no images"),
        ('{"images": [["a.jpg", ["x"]], ["b.jpg"]]}', "images\\[1\\]: expected \\[path, \\[labels...\\]\\]"),
        ('{"images": [["a.jpg", ["x", 3]]]}', "images\\[0\\]: labels must be strings"),
        ('{"images": [["a.jpg", ["x"]]], "classes": ["x", "x"]}', "\"classes\" repeats"),
        ('{"files": []}', "unrecognised annotation format"),
        ("[1, 2]", "unrecognised annotation format"),
    ],
)
def test_bad_json_files_raise_data_error_naming_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(DataError, match=f"ann.json{'' if message.startswith(':') else ': '}{message}"):
        read_annotations(path)


def test_missing_file_empty_manifest_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_annotations(tmp_path / "missing.json")
    empty = _write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no images"):
        read_annotations(empty)
    with pytest.raises(DataError, match="unknown annotation format"):
        read_annotations(empty, format="csv")  # type: ignore[arg-type]


def test_annotations_module_never_imports_the_model() -> None:
    code = (
        "import sys, ramtag.data.annotations; "
        "print(any(name.startswith('ramtag.model') for name in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "False"
