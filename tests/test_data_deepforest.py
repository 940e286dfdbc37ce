"""lgd.demo.deepforest: VOC -> tiled COCO conversion on hand-made fixtures, the demo registration, the real data.

Fixtures (tests/fixtures/voc_tiles/): scene_a.png 100x80 and scene_b.png 40x30, pixel (x, y) = RGB
(x, y, (x + y) % 256), so a tile's pixels reveal where it was cut. Boxes (x1, y1, x2, y2):
    scene_a: Tree (5,5,20,25), Dead (30,10,60,30), Alive (92,75,99,79), Tree (48,60,58,70)
    scene_b: Tree (10,5,30,25), Tree (35,-3,45,10) (sticks out of the 40x30 image: clipped to (35,0,40,10))
With tile_size=50, overlap=10: scene_a tiles start at x in {0, 40, 50}, y in {0, 30}; scene_b is one 40x30 tile.
"""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("detectron2")

from PIL import Image

from lgd.demo import assets, deepforest
from lgd.demo.deepforest import (DEMO_LABEL_MAP, boxes_in_tile, convert_voc_to_tiled_coco, read_voc_xml,
                                 tile_origins)

FIXTURES = Path(__file__).parent / "fixtures" / "voc_tiles"
TILING = {"tile_size": 50, "overlap": 10, "min_visible": 0.5, "min_side": 2.0}

# Expected tiles of scene_a, by origin: (x1, y1, x2, y2) in tile coordinates, worked out by hand.
#   (30,10,60,30) area 600: in tile x 0-50 20x20 visible (2/3, kept, clipped), in 40-90 20x20 (kept),
#                           in 50-100 10x20 (1/3 < 0.5, dropped)
#   (48,60,58,70) area 100: in tile x 0-50 2x10 visible (0.2, dropped) -> tile (0,30) is empty,
#                           in 40-90 whole, in 50-100 8x10 (0.8, kept)
#   (92,75,99,79): whole in tile (50,30) only; cut to nothing by tile (40,30) (x ends at 90)
SCENE_A = {
    (0, 0): [(5, 5, 20, 25), (30, 10, 50, 30)],
    (40, 0): [(0, 10, 20, 30)],
    (50, 0): [],
    (0, 30): [],
    (40, 30): [(8, 30, 18, 40)],
    (50, 30): [(42, 45, 49, 49), (0, 30, 8, 40)],
}


def _xyxy(bbox):
    x, y, w, h = bbox
    return (x, y, x + w, y + h)


@pytest.fixture
def converted(tmp_path):
    manifest = convert_voc_to_tiled_coco(sorted(FIXTURES.glob("*.xml")), tmp_path / "out", ["scene_b"],
                                         DEMO_LABEL_MAP, **TILING)
    coco = {split: json.loads((tmp_path / "out" / f"{split}.json").read_text()) for split in ("train", "val")}
    return tmp_path / "out", manifest, coco


def test_tile_origins():
    assert tile_origins(100, 50, 10) == [0, 40, 50]
    assert tile_origins(80, 50, 10) == [0, 30]
    assert tile_origins(50, 50, 10) == [0]
    assert tile_origins(30, 50, 10) == [0]
    assert tile_origins(2299, 400, 50) == [0, 350, 700, 1050, 1400, 1750, 1899]
    with pytest.raises(ValueError, match="overlap"):
        tile_origins(100, 50, 50)


def test_read_voc_xml_maps_labels_and_clips_to_the_image():
    image, size, boxes, names = read_voc_xml(FIXTURES / "scene_b.xml", DEMO_LABEL_MAP)
    assert image == FIXTURES / "scene_b.png" and size == (30, 40)
    np.testing.assert_array_equal(boxes, [[10, 5, 30, 25], [35, 0, 40, 10]])
    assert names == ["Tree", "Tree"]
    _, _, _, names = read_voc_xml(FIXTURES / "scene_a.xml", DEMO_LABEL_MAP)
    assert names == ["Tree"] * 4  # Dead and Alive map to Tree
    with pytest.raises(ValueError, match="'Dead'"):
        read_voc_xml(FIXTURES / "scene_a.xml", {"Tree": "Tree", "Alive": "Tree"})


def test_boxes_in_tile_thresholds():
    boxes = np.array([[0.0, 0.0, 10.0, 10.0]])
    assert boxes_in_tile(boxes, (5, 0, 20, 20), 0.5, 2.0)[0].tolist() == [0]    # exactly half visible: kept
    assert boxes_in_tile(boxes, (6, 0, 20, 20), 0.5, 2.0)[0].tolist() == []     # 40 %: dropped
    assert boxes_in_tile(boxes, (8, 0, 20, 20), 0.1, 3.0)[0].tolist() == []     # 2 px wide < min_side


def test_tiles_boxes_and_pixels(converted):
    out, manifest, coco = converted
    train = coco["train"]
    assert train["categories"] == [{"id": 1, "name": "Tree"}]
    got = {tuple(im["tile_origin"]): [] for im in train["images"]}
    origin_of = {im["id"]: tuple(im["tile_origin"]) for im in train["images"]}
    for ann in train["annotations"]:
        got[origin_of[ann["image_id"]]].append(_xyxy(ann["bbox"]))
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0
        assert ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])
    assert got == SCENE_A  # exact coordinates (fixture integers survive shifting)
    source = np.asarray(Image.open(FIXTURES / "scene_a.png").convert("RGB"))
    for im in train["images"]:
        x0, y0 = im["tile_origin"]
        pixels = np.asarray(Image.open(out / im["file_name"]))
        assert pixels.shape == (im["height"], im["width"], 3) == (50, 50, 3)
        np.testing.assert_array_equal(pixels, source[y0:y0 + 50, x0:x0 + 50])
    assert manifest["stats"]["train"] == {"source_images": ["scene_a"], "images": 6, "boxes": 6,
                                          "empty_images": 2, "source_boxes": 4}


def test_whole_boxes_round_trip_to_source_coordinates(converted):
    _, _, coco = converted
    _, _, boxes, _ = read_voc_xml(FIXTURES / "scene_a.xml", DEMO_LABEL_MAP)
    originals = {tuple(b) for b in boxes.tolist()} - {(30, 10, 60, 30)}  # no tile holds x 30..60 whole
    origin_of = {im["id"]: im["tile_origin"] for im in coco["train"]["images"]}
    back = set()
    for ann in coco["train"]["annotations"]:
        x0, y0 = origin_of[ann["image_id"]]
        x1, y1, x2, y2 = _xyxy(ann["bbox"])
        back.add((x1 + x0, y1 + y0, x2 + x0, y2 + y0))
    assert originals <= back  # each box that fits in a tile appears whole, at exactly its source coordinates


def test_split_by_source_image_has_no_leakage(converted):
    out, manifest, coco = converted
    sources = {split: {im["source_image"] for im in coco[split]["images"]} for split in coco}
    assert sources == {"train": {"scene_a"}, "val": {"scene_b"}}
    files = {split: {im["file_name"] for im in coco[split]["images"]} for split in coco}
    assert not files["train"] & files["val"]
    ids = [im["id"] for split in coco for im in coco[split]["images"]]
    assert len(ids) == len(set(ids))
    val = coco["val"]
    assert [(im["width"], im["height"]) for im in val["images"]] == [(40, 30)]  # smaller than a tile: whole image
    assert [_xyxy(a["bbox"]) for a in val["annotations"]] == [(10, 5, 30, 25), (35, 0, 40, 10)]
    assert manifest["val_images"] == ["scene_b"] and manifest["converter_version"] == deepforest.CONVERTER_VERSION


def test_bad_arguments(tmp_path):
    xmls = sorted(FIXTURES.glob("*.xml"))
    with pytest.raises(ValueError, match="val_images"):
        convert_voc_to_tiled_coco(xmls, tmp_path / "a", ["nope"], DEMO_LABEL_MAP, **TILING)
    with pytest.raises(ValueError, match="min_visible"):
        convert_voc_to_tiled_coco(xmls, tmp_path / "a", [], DEMO_LABEL_MAP, **{**TILING, "min_visible": 0})
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="out_dir"):
        convert_voc_to_tiled_coco(xmls, tmp_path / "exists", [], DEMO_LABEL_MAP, **TILING)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no temporary folder left behind


def test_missing_assets_say_how_to_fetch(tmp_path):
    for accessor in (assets.demo_asset_dir, assets.mobilenetv2_weights_path, deepforest.prepare_demo_dataset):
        with pytest.raises(assets.AssetsMissingError, match="fetch_demo_assets.sh"):
            accessor(tmp_path)


def test_fetch_script_is_a_no_op_when_assets_are_present(tmp_path):
    """Present asset folders are kept as they are and nothing is downloaded (no network needed)."""
    for folder in (assets.DEEPFOREST_ASSETS, assets.MOBILENETV2_ASSETS):
        (tmp_path / "assets" / folder).mkdir(parents=True)
    script = Path(__file__).parents[1] / assets.FETCH_SCRIPT
    run = subprocess.run(["bash", str(script)], env={"LGD_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("already in") == 2
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == sorted(
        [assets.DEEPFOREST_ASSETS, assets.MOBILENETV2_ASSETS])  # scratch folder removed


def test_demo_registration_is_cached_and_idempotent(tmp_path):
    """prepare/register on a fake cache whose 'deepforest' assets are the fixtures (the real ones may be absent)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    fake = tmp_path / "assets" / assets.DEEPFOREST_ASSETS
    fake.mkdir(parents=True)
    for f in FIXTURES.iterdir():
        (fake / f.name).write_bytes(f.read_bytes())
    (fake / "scene_b.xml").rename(fake / (deepforest.DEMO_VAL_IMAGES[0] + ".xml"))  # the demo's val image
    for name in (deepforest.DEMO_TRAIN, deepforest.DEMO_VAL):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    try:
        paths = deepforest.register_demo_datasets(tmp_path)
        stamp = Path(paths["train_json"]).stat().st_mtime_ns
        assert deepforest.register_demo_datasets(tmp_path) == paths  # second call: no conversion, no error
        assert Path(paths["train_json"]).stat().st_mtime_ns == stamp
        assert f"-v{deepforest.CONVERTER_VERSION}-" in paths["dataset_dir"]
        val = DatasetCatalog.get(deepforest.DEMO_VAL)
        assert len(val) == 1 and len(val[0]["annotations"]) == 2
        assert MetadataCatalog.get(deepforest.DEMO_TRAIN).thing_classes == ["Tree"]
        assert len(DatasetCatalog.get(deepforest.DEMO_TRAIN)) == 1  # 100x80 < the demo's 400 px tiles
    finally:
        for name in (deepforest.DEMO_TRAIN, deepforest.DEMO_VAL):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_real_deepforest_data_has_951_boxes():
    try:
        asset_dir = assets.demo_asset_dir()
    except assets.AssetsMissingError:
        pytest.skip("demo assets not fetched (bash scripts/fetch_demo_assets.sh)")
    counts = {xml.stem: len(read_voc_xml(xml, DEMO_LABEL_MAP)[2]) for xml in sorted(asset_dir.glob("*.xml"))}
    assert sum(counts.values()) == 951, counts
    assert set(deepforest.DEMO_VAL_IMAGES) < set(counts)
