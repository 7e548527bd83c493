"""The demo world: deterministic, labelled exactly as drawn, long-tailed, and never left half-written."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from mumic_ml import demo_world
from mumic_ml.demo_world import (
    CLASS_NAMES,
    COLOUR_RGB,
    COMPOSITE_CLASSES,
    COUNT_LABELS,
    HELD_OUT_CLASSES,
    SHAPE_PLURALS,
    caption_for,
    generate_demo_world,
    labels_for,
    load_demo_world,
    render,
    scene_for,
)
from mumic_ml.taxonomy import load_taxonomy

N_FULL = 2000


def read_manifest(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def full_world(tmp_path_factory):
    return generate_demo_world(tmp_path_factory.mktemp("demo") / "world", n_images=N_FULL, seed=0)


@pytest.fixture(scope="module")
def full_rows(full_world):
    return read_manifest(full_world.manifest_path)


def label_counts(rows):
    counts = dict.fromkeys(CLASS_NAMES, 0)
    for row in rows:
        for label in row["labels"].split("|"):
            counts[label] += 1
    return counts


def test_world_layout(full_world, full_rows):
    assert full_world.n_images == N_FULL == len(full_rows)
    assert full_world.class_names == CLASS_NAMES
    assert set(full_world.held_out_classes) == set(HELD_OUT_CLASSES)
    assert set(HELD_OUT_CLASSES) <= set(CLASS_NAMES)
    assert list(full_rows[0]) == ["path", "labels", "caption"]
    assert full_rows[0]["path"] == "images/img_000000.png"
    assert all((full_world.root / row["path"]).is_file() for row in full_rows)
    assert load_taxonomy(full_world.taxonomy_path).names == list(CLASS_NAMES)
    assert load_demo_world(full_world.root) == full_world


def test_world_json_matches_manifest(full_world, full_rows):
    meta = json.loads(full_world.world_path.read_text())
    assert meta["seed"] == 0 and meta["n_images"] == N_FULL and meta["image_size"] == 64
    assert meta["label_counts"] == label_counts(full_rows)
    assert meta["held_out_classes"] == list(HELD_OUT_CLASSES)


def test_images_are_rgb_of_requested_size(full_world, full_rows):
    for row in full_rows[:50]:
        with Image.open(full_world.root / row["path"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)


def test_long_tail_and_every_class_has_positives(full_rows):
    frequencies = {name: count / N_FULL for name, count in label_counts(full_rows).items()}
    assert min(frequencies.values()) * N_FULL >= 15
    assert 0.4 <= max(frequencies.values()) <= 0.7
    assert min(frequencies.values()) <= 0.03
    assert max(frequencies.values()) / min(frequencies.values()) > 10
    assert all(frequencies[name] >= 0.03 for name in HELD_OUT_CLASSES)


def test_manifest_labels_equal_regenerated_scene(full_rows):
    for index, row in enumerate(full_rows[:300]):
        assert row["labels"].split("|") == labels_for(scene_for(0, index, 64))


def test_labels_describe_the_scene():
    for index in range(300):
        scene = scene_for(3, index, 64)
        labels = labels_for(scene)
        assert set(labels) <= set(CLASS_NAMES)
        n = len(scene.objects)
        assert 1 <= n <= 4
        assert [c for c in labels if c in COUNT_LABELS] == [COUNT_LABELS[min(n, 3) - 1]]
        assert {obj.shape for obj in scene.objects} == {c for c in labels if c in SHAPE_PLURALS}
        assert {obj.colour for obj in scene.objects} == {c for c in labels if c in COLOUR_RGB}
        for colour, shape in COMPOSITE_CLASSES:
            on_one_object = any(obj.colour == colour and obj.shape == shape for obj in scene.objects)
            assert (f"{colour} {shape}" in labels) == on_one_object
            if on_one_object:
                assert colour in labels and shape in labels
        assert f"{scene.background} background" in labels


def test_objects_are_drawn_in_their_unambiguous_colour():
    palette = np.array(list(COLOUR_RGB.values()), dtype=float)
    names = list(COLOUR_RGB)
    checked = 0
    for index in range(200):
        scene = scene_for(1, index, 64)
        pixels = np.asarray(render(scene), dtype=float)
        for obj in scene.objects:
            if obj.shape == "ring":
                continue
            x, y = (int(round(v)) for v in obj.center)
            patch = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
            assert names[int(np.argmin(((palette - patch) ** 2).sum(axis=1)))] == obj.colour
            checked += 1
    assert checked > 200


def test_objects_stay_inside_the_image_and_apart():
    for index in range(300):
        scene = scene_for(2, index, 64)
        for i, a in enumerate(scene.objects):
            r = a.diameter / 2
            assert r <= a.center[0] <= 64 - r and r <= a.center[1] <= 64 - r
            low, high = demo_world._SIZE_FRACTIONS[a.size]
            assert low * 64 <= a.diameter <= high * 64
            for b in scene.objects[i + 1 :]:
                gap = np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1])
                assert gap >= r + b.diameter / 2 - 1e-9


def test_captions_mention_every_object_and_the_background(full_rows):
    templates_seen = set()
    for index, row in enumerate(full_rows[:300]):
        scene = scene_for(0, index, 64)
        caption = row["caption"]
        for obj in scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in caption or (
                f"{obj.size} {obj.colour} {SHAPE_PLURALS[obj.shape]}" in caption
            )
        assert f"{scene.background} background" in caption
        templates_seen.add(caption.split()[0])
    assert len(templates_seen) >= 3


def test_caption_wording_varies_with_rng():
    scene = scene_for(0, 3, 64)
    captions = {caption_for(scene, np.random.default_rng(s)) for s in range(20)}
    assert len(captions) > 1


def test_same_seed_gives_identical_world_and_other_seed_differs(tmp_path):
    a = generate_demo_world(tmp_path / "a", n_images=20, seed=7)
    b = generate_demo_world(tmp_path / "b", n_images=20, seed=7)
    c = generate_demo_world(tmp_path / "c", n_images=20, seed=8)
    assert a.manifest_path.read_bytes() == b.manifest_path.read_bytes()
    assert a.taxonomy_path.read_bytes() == b.taxonomy_path.read_bytes()
    for i in range(20):
        name = f"img_{i:06d}.png"
        assert (a.images_dir / name).read_bytes() == (b.images_dir / name).read_bytes()
    assert a.manifest_path.read_bytes() != c.manifest_path.read_bytes()
    assert (a.images_dir / "img_000000.png").read_bytes() != (c.images_dir / "img_000000.png").read_bytes()


def test_a_smaller_world_is_a_prefix_of_a_larger_one(tmp_path, full_world, full_rows):
    small = generate_demo_world(tmp_path / "small", n_images=10, seed=0)
    assert read_manifest(small.manifest_path) == full_rows[:10]
    for i in range(10):
        name = f"img_{i:06d}.png"
        assert (small.images_dir / name).read_bytes() == (full_world.images_dir / name).read_bytes()


def test_other_image_sizes(tmp_path):
    world = generate_demo_world(tmp_path / "w", n_images=3, image_size=96, seed=0)
    with Image.open(world.images_dir / "img_000000.png") as image:
        assert image.size == (96, 96)


@pytest.mark.parametrize("kwargs", [{"n_images": 0}, {"image_size": 16}, {"seed": -1}])
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_demo_world(tmp_path / "w", **{"n_images": 5, **kwargs})


def test_failed_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    real_render = demo_world.render
    calls = {"n": 0}

    def failing_render(scene):
        calls["n"] += 1
        if calls["n"] > 10:
            raise RuntimeError("killed")
        return real_render(scene)

    monkeypatch.setattr(demo_world, "render", failing_render)
    with pytest.raises(RuntimeError):
        generate_demo_world(tmp_path / "fresh", n_images=20)
    assert not (tmp_path / "fresh" / "manifest.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_regeneration_keeps_the_previous_world(tmp_path, monkeypatch):
    out = tmp_path / "world"
    previous = generate_demo_world(out, n_images=5, seed=1)
    manifest_before = previous.manifest_path.read_bytes()
    image_before = (previous.images_dir / "img_000004.png").read_bytes()

    def failing_render(scene):
        raise RuntimeError("killed")

    monkeypatch.setattr(demo_world, "render", failing_render)
    with pytest.raises(RuntimeError):
        generate_demo_world(out, n_images=20, seed=2)
    assert previous.manifest_path.read_bytes() == manifest_before
    assert (previous.images_dir / "img_000004.png").read_bytes() == image_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_refuses_to_replace_a_folder_that_is_not_a_world(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        generate_demo_world(tmp_path / "photos", n_images=2)
    assert (tmp_path / "photos" / "keep.jpg").read_bytes() == b"mine"
