"""lgd.data.register: COCO json by path ("[NAME=]ann.json:images/"), Pascal VOC folders, idempotency, errors."""
import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from detectron2.data import DatasetCatalog, MetadataCatalog

from lgd.data.register import parse_coco_spec, register_coco_by_path, register_voc_by_path

FIXTURES = Path(__file__).parent / "fixtures" / "voc_tiles"


@pytest.fixture
def unregister():
    """Names registered by a test are removed afterwards, so tests do not leak into detectron2's catalogs."""
    names = []
    yield names.append
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


@pytest.fixture
def coco_files(tmp_path):
    (tmp_path / "images").mkdir()
    shutil.copy(FIXTURES / "scene_b.png", tmp_path / "images" / "b.png")
    coco = {"images": [{"id": 7, "file_name": "b.png", "width": 40, "height": 30}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 20], "area": 400,
                             "iscrowd": 0}],
            "categories": [{"id": 3, "name": "tree"}]}
    (tmp_path / "ann=v1.json").write_text(json.dumps(coco))
    return tmp_path / "ann=v1.json", tmp_path / "images"


@pytest.mark.parametrize("spec, expected", [
    ("trees=a/ann.json:imgs/", ("trees", "a/ann.json", "imgs/")),
    ("a/ann.json:imgs", ("ann", "a/ann.json", "imgs")),
    ("a/x=y/ann.json:im:g", ("ann", "a/x=y/ann.json", "im:g")),  # '=' in the path, ':' in the image root
    ("/abs/val.json:/data/img", ("val", "/abs/val.json", "/data/img")),
])
def test_parse_coco_spec(spec, expected):
    assert parse_coco_spec(spec) == expected


@pytest.mark.parametrize("spec", ["ann.json", "ann.json:", "x=.json:imgs", "imgs/:ann.json", 3])
def test_parse_coco_spec_rejects(spec):
    with pytest.raises(ValueError, match="spec"):
        parse_coco_spec(spec)


def test_register_coco_by_path_loads_and_is_idempotent(coco_files, unregister):
    json_file, images = coco_files
    name = register_coco_by_path(f"lgd_test_trees={json_file}:{images}")
    unregister(name)
    assert name == "lgd_test_trees"
    assert register_coco_by_path(f"lgd_test_trees={json_file}:{images}/") == name  # same files: no-op
    (record,) = DatasetCatalog.get(name)
    assert record["file_name"] == str(images / "b.png") and record["image_id"] == 7
    assert record["annotations"][0]["bbox"] == [10, 5, 20, 20] and record["annotations"][0]["category_id"] == 0
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["tree"] and meta.evaluator_type == "coco"
    assert meta.json_file == str(json_file)
    with pytest.raises(ValueError, match="already registered"):
        register_coco_by_path(f"lgd_test_trees={json_file}:{images.parent}")


def test_register_coco_by_path_derives_the_name(coco_files, unregister):
    json_file, images = coco_files
    name = register_coco_by_path(f"{json_file}:{images}")
    unregister(name)
    assert name == "ann=v1" and name in DatasetCatalog.list()


def test_register_coco_by_path_missing_files(coco_files, tmp_path):
    json_file, images = coco_files
    with pytest.raises(FileNotFoundError, match="json_file.*nope.json"):
        register_coco_by_path(f"x={tmp_path / 'nope.json'}:{images}")
    with pytest.raises(FileNotFoundError, match="image_root.*nodir"):
        register_coco_by_path(f"x={json_file}:{tmp_path / 'nodir'}")
    assert "x" not in DatasetCatalog.list()


def test_register_voc_by_path(tmp_path, unregister):
    voc = tmp_path / "VOCmini"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / sub).mkdir(parents=True)
    xml = (FIXTURES / "scene_a.xml").read_text().replace("Dead", "Tree").replace("Alive", "Tree")
    (voc / "Annotations" / "a.xml").write_text(xml)
    (voc / "Annotations" / "b.xml").write_text(xml)
    # two ids: detectron2 v0.6's loader np.loadtxt's the split file and cannot iterate a single id
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\n")
    name = register_voc_by_path("lgd_test_voc", voc, "trainval", class_names=["Tree"])
    unregister(name)
    assert register_voc_by_path("lgd_test_voc", voc, "trainval", class_names=["Tree"]) == name
    record, _ = DatasetCatalog.get(name)
    assert len(record["annotations"]) == 4 and MetadataCatalog.get(name).evaluator_type == "pascal_voc"
    with pytest.raises(FileNotFoundError, match="split"):
        register_voc_by_path("lgd_test_voc2", voc, "test")
    with pytest.raises(ValueError, match="year"):
        register_voc_by_path("lgd_test_voc2", voc, "trainval", year=2010)


def _write_json(path, images, annotations=()):
    path.write_text(json.dumps({"images": images, "annotations": list(annotations),
                                "categories": [{"id": 3, "name": "tree"}]}))
    return path


@pytest.mark.parametrize("content, size, message", [
    (b"", (40, 30), "is an empty file"),
    (b"not an image at all" * 10, (40, 30), "is not an image PIL can read"),
    (None, (41, 30), "is 40x30 pixels, the json says 41x30"),
])
def test_image_headers_are_checked_up_front(tmp_path, content, size, message):
    from lgd.data.register import DatasetError, validate_coco_json

    (tmp_path / "images").mkdir()
    image = tmp_path / "images" / "b.png"
    if content is None:
        shutil.copy(FIXTURES / "scene_b.png", image)
    else:
        image.write_bytes(content)
    ann = _write_json(tmp_path / "ann.json", [{"id": 7, "file_name": "b.png", "width": size[0], "height": size[1]}])
    with pytest.raises(DatasetError, match=re.escape(message)) as info:
        validate_coco_json(str(ann), str(tmp_path / "images"))
    assert str(image) in str(info.value) and "image id 7" in str(info.value) and "<" not in str(info.value)


def test_image_size_follows_exif_orientation(tmp_path):
    from PIL import Image

    from lgd.data.register import validate_coco_json

    (tmp_path / "images").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: detectron2 reads it 30 x 40
    Image.new("RGB", (40, 30)).save(tmp_path / "images" / "r.jpg", exif=exif)
    ann = _write_json(tmp_path / "ann.json", [{"id": 1, "file_name": "r.jpg", "width": 30, "height": 40}])
    assert validate_coco_json(str(ann), str(tmp_path / "images"))["images"] == 1


def test_boxes_outside_their_image_are_dropped_with_a_count(tmp_path):
    from detectron2.structures import BoxMode

    from lgd.data.register import drop_degenerate_boxes, validate_coco_json

    (tmp_path / "images").mkdir()
    shutil.copy(FIXTURES / "scene_b.png", tmp_path / "images" / "b.png")
    boxes = [[10, 5, 20, 20], [45, 0, 5, 5], [-10, -10, 5, 5], [35, 25, 10, 10]]  # inside, right, above-left, partly
    ann = _write_json(tmp_path / "ann.json", [{"id": 7, "file_name": "b.png", "width": 40, "height": 30}],
                      [{"id": i, "image_id": 7, "category_id": 3, "bbox": b} for i, b in enumerate(boxes)])
    assert validate_coco_json(str(ann), str(tmp_path / "images"), training=True)["outside_boxes"] == 2
    record = {"width": 40, "height": 30, "annotations": [{"bbox": b, "bbox_mode": BoxMode.XYWH_ABS} for b in boxes]}
    kept, dropped, images = drop_degenerate_boxes([record])
    assert dropped == 2 and images == 0 and [a["bbox"] for a in kept[0]["annotations"]] == [boxes[0], boxes[3]]


def test_image_check_reports_progress_on_large_sets(coco_files, monkeypatch, capsys):
    import lgd.data.register as register
    from lgd.tools.cli import console_progress

    ann, images = coco_files
    monkeypatch.setattr(register, "_PROGRESS_FROM", 1)  # the one image is "a large set"
    with console_progress():
        register.validate_coco_json(str(ann), str(images))
    out = capsys.readouterr().out
    assert f"lgd.data INFO: {ann}: checked 1 of 1 image headers" in out, out
