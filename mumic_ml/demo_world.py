"""The demo world: a seeded, procedural multi-label image collection that stands in for a user's photos.

No pretrained CLIP weights or public multi-label photo set can be fetched here, so the demo brings its own data,
written to disk exactly as a real user would bring it: an image folder, a manifest (`path,labels,caption`) and a
taxonomy. Every image shows one to four coloured shapes on a patterned background; its labels name the shapes,
colours, sizes, object count, background kind and a few colour-shape compositions ("red circle"). Shapes and
colours follow skewed distributions so label frequencies are long-tailed like real annotations, and three
compositional classes are marked as held out so a later step can test zero-shot scoring on them.

Each image depends only on `(seed, index)`: any image can be regenerated on its own (tests check its labels
against its scene) and a larger world starts with exactly the images of a smaller one.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mumic_ml.io import atomic_directory, atomic_write_json, atomic_write_text, read_json
from mumic_ml.taxonomy import ClassSpec, Taxonomy, save_taxonomy

GENERATOR_VERSION = 1

# Ordered from most to least frequent: the order sets each value's Zipf weight.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "white", "orange", "purple")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "gradient")

SHAPE_PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "ring": "rings",
}

# Saturated or very light fills, far apart from each other and from the dark, grey backgrounds, so that the
# per-object jitter never makes one colour look like another.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "blue": (45, 80, 230),
    "green": (40, 175, 50),
    "yellow": (235, 215, 40),
    "white": (238, 238, 238),
    "orange": (245, 135, 25),
    "purple": (150, 55, 200),
}

COUNT_LABELS: tuple[str, ...] = ("one object", "two objects", "three or more objects")
SIZE_LABELS = {size: f"{size} object" for size in SIZES}
BACKGROUND_LABELS = {kind: f"{kind} background" for kind in BACKGROUNDS}
COMPOSITE_CLASSES: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("blue", "circle"),
    ("red", "square"),
    ("blue", "square"),
    ("green", "square"),
    ("red", "triangle"),
    ("green", "triangle"),
    ("yellow", "star"),
    ("white", "cross"),
)
# Common enough to evaluate on, and each of their words also appears in a composite that stays in training, so a
# model can only score them by composing what it learned.
HELD_OUT_CLASSES: tuple[str, ...] = ("blue circle", "red triangle", "green square")

CLASS_NAMES: tuple[str, ...] = (
    *SHAPES,
    *COLOURS,
    *SIZE_LABELS.values(),
    *COUNT_LABELS,
    *BACKGROUND_LABELS.values(),
    *(f"{colour} {shape}" for colour, shape in COMPOSITE_CLASSES),
)

PROMPT_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "an image with {}.", "a picture showing {}.")

_OBJECT_COUNT_PROBS = (0.40, 0.30, 0.18, 0.12)
_BACKGROUND_PROBS = (0.40, 0.30, 0.20, 0.10)
_SIZE_FRACTIONS = {"small": (0.18, 0.25), "large": (0.35, 0.50)}
# A scene is either a close-up (mostly large objects) or a wide view (mostly small ones); drawing sizes per
# object independently would put "small object" in almost every multi-object image.
_CLOSE_UP_LARGE_PROB = 0.9
_WIDE_VIEW_LARGE_PROB = 0.1
_COLOUR_JITTER = 12
_NOISE_SIGMA = 4.0
_MIN_IMAGE_SIZE = 32

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects} on a {background}",
    "a {background} with {objects}",
    "a photo of {objects} on a {background}.",
    "an image with {objects} on a {background}.",
    "{count} on a {background}: {objects}",
)


def _zipf(n: int, exponent: float = 1.0) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


_SHAPE_PROBS = _zipf(len(SHAPES))
_COLOUR_PROBS = _zipf(len(COLOURS))


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: its label-level attributes and the exact geometry and fill used to draw it."""

    shape: str
    colour: str
    size: str
    center: tuple[float, float]
    diameter: float
    angle: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """Everything `render` needs, so an image and its labels both follow from the scene alone."""

    image_size: int
    background: str
    background_tones: tuple[tuple[int, int, int], tuple[int, int, int]]
    pattern_period: int
    pattern_angle: float
    objects: tuple[SceneObject, ...]
    noise_seed: int


@dataclass(frozen=True)
class DemoWorld:
    root: Path
    images_dir: Path
    manifest_path: Path
    taxonomy_path: Path
    world_path: Path
    n_images: int
    class_names: tuple[str, ...]
    held_out_classes: tuple[str, ...]


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """Independent streams per image (scene, caption), so wording changes never move what is drawn."""
    return np.random.default_rng((seed, index, stream))


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")


def _cells(n_objects: int, image_size: int, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """Disjoint cells (x0, y0, width, height), one per object, so no object hides another."""
    side = float(image_size)
    half = side / 2
    if n_objects == 1:
        return [(0.0, 0.0, side, side)]
    if n_objects == 2:
        if rng.random() < 0.5:
            return [(0.0, 0.0, half, side), (half, 0.0, half, side)]
        return [(0.0, 0.0, side, half), (0.0, half, side, half)]
    quadrants = [(0.0, 0.0), (half, 0.0), (0.0, half), (half, half)]
    chosen = sorted(rng.choice(4, size=n_objects, replace=False))
    return [(*quadrants[i], half, half) for i in chosen]


def _background_tones(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A dark and a mid tone, both near-grey, so every object colour (white included) stands out on either."""
    dark = int(rng.integers(15, 46))
    light = dark + int(rng.integers(35, 51))
    tint = rng.integers(-6, 7, size=3)
    return (
        tuple(int(v) for v in np.clip(dark + tint, 0, 255)),
        tuple(int(v) for v in np.clip(light + tint, 0, 255)),
    )


def scene_for(seed: int, index: int, image_size: int = 64) -> Scene:
    """The scene of image `index` in the world of `seed`; it depends on nothing else."""
    _check_image_size(image_size)
    rng = _rng(seed, index, 0)
    n_objects = int(rng.choice(len(_OBJECT_COUNT_PROBS), p=_OBJECT_COUNT_PROBS)) + 1
    background = BACKGROUNDS[int(rng.choice(len(BACKGROUNDS), p=_BACKGROUND_PROBS))]
    tones = _background_tones(rng)
    period = int(rng.integers(6, 11))
    pattern_angle = float(rng.choice([0.0, 45.0, 90.0, 135.0]))
    large_prob = _CLOSE_UP_LARGE_PROB if rng.random() < 0.5 else _WIDE_VIEW_LARGE_PROB
    objects = []
    for x0, y0, width, height in _cells(n_objects, image_size, rng):
        shape = SHAPES[int(rng.choice(len(SHAPES), p=_SHAPE_PROBS))]
        colour = COLOURS[int(rng.choice(len(COLOURS), p=_COLOUR_PROBS))]
        size = "large" if rng.random() < large_prob else "small"
        low, high = _SIZE_FRACTIONS[size]
        diameter = min(float(rng.uniform(low, high)) * image_size, width, height)
        center = (
            float(rng.uniform(x0 + diameter / 2, x0 + width - diameter / 2)),
            float(rng.uniform(y0 + diameter / 2, y0 + height - diameter / 2)),
        )
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLOUR_RGB[colour]) + jitter, 0, 255))
        angle = float(rng.uniform(-25.0, 25.0))
        objects.append(SceneObject(shape, colour, size, center, diameter, angle, rgb))
    noise_seed = int(rng.integers(0, 2**32))
    return Scene(image_size, background, tones, period, pattern_angle, tuple(objects), noise_seed)


def labels_for(scene: Scene) -> list[str]:
    """The scene's labels in taxonomy order; a composite needs one object carrying both of its attributes."""
    shapes = {obj.shape for obj in scene.objects}
    colours = {obj.colour for obj in scene.objects}
    sizes = {obj.size for obj in scene.objects}
    pairs = {(obj.colour, obj.shape) for obj in scene.objects}
    n = len(scene.objects)
    present = {
        *shapes,
        *colours,
        *(SIZE_LABELS[s] for s in sizes),
        COUNT_LABELS[min(n, 3) - 1],
        BACKGROUND_LABELS[scene.background],
        *(f"{colour} {shape}" for colour, shape in COMPOSITE_CLASSES if (colour, shape) in pairs),
    }
    return [name for name in CLASS_NAMES if name in present]


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_for(scene: Scene, rng: np.random.Generator) -> str:
    """A sentence naming every object (size, colour, shape) and the background, in the class names' words."""
    groups = Counter((obj.size, obj.colour, obj.shape) for obj in scene.objects)
    phrases = []
    for (size, colour, shape), count in groups.items():
        if count == 1:
            phrases.append(f"a {size} {colour} {shape}")
        else:
            phrases.append(f"{_NUMBER_WORDS[count]} {size} {colour} {SHAPE_PLURALS[shape]}")
    order = rng.permutation(len(phrases))
    n = len(scene.objects)
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    return template.format(
        objects=_join([phrases[i] for i in order]),
        background=BACKGROUND_LABELS[scene.background],
        count=f"{_NUMBER_WORDS[n]} object{'s' if n > 1 else ''}",
    )


def _background_array(scene: Scene) -> np.ndarray:
    size = scene.image_size
    dark, light = (np.array(t, dtype=np.float32) for t in scene.background_tones)
    if scene.background == "plain":
        return np.broadcast_to(dark, (size, size, 3)).copy()
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = math.radians(scene.pattern_angle)
    along = xs * math.cos(theta) + ys * math.sin(theta)
    if scene.background == "striped":
        mask = (np.floor(along / (scene.pattern_period / 2)) % 2).astype(bool)
    elif scene.background == "dotted":
        period = scene.pattern_period
        dx = xs % period - period / 2
        dy = ys % period - period / 2
        mask = dx * dx + dy * dy <= 2.0
    else:
        t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
        return dark + (light - dark) * t[..., None]
    return np.where(mask[..., None], light, dark)


def _polygon(obj: SceneObject, unit_points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale, rotate and place a shape given on the unit circle (y pointing down, as in image coordinates)."""
    radius = obj.diameter / 2
    cos_a, sin_a = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    cx, cy = obj.center
    return [(cx + radius * (x * cos_a - y * sin_a), cy + radius * (x * sin_a + y * cos_a)) for x, y in unit_points]


def _regular(n: int, start_degrees: float) -> list[tuple[float, float]]:
    thetas = (math.radians(start_degrees + 360.0 * k / n) for k in range(n))
    return [(math.cos(theta), math.sin(theta)) for theta in thetas]


def _star() -> list[tuple[float, float]]:
    """Five points: outer vertices on the unit circle alternate with inner ones at 0.45 of the radius."""
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.45
        theta = math.radians(-90.0 + 36.0 * k)
        points.append((radius * math.cos(theta), radius * math.sin(theta)))
    return points


def _cross() -> list[tuple[float, float]]:
    w = 0.3
    arm = math.sqrt(1.0 - w * w)
    return [
        (w, -arm), (w, -w), (arm, -w), (arm, w), (w, w), (w, arm),
        (-w, arm), (-w, w), (-arm, w), (-arm, -w), (-w, -w), (-w, -arm),
    ]  # fmt: skip


_UNIT_SHAPES = {
    "square": _regular(4, 45.0),
    "triangle": _regular(3, -90.0),
    "star": _star(),
    "cross": _cross(),
}


def render(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image, with its sensor-like noise, deterministically from the scene."""
    canvas = Image.fromarray(np.round(_background_array(scene)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        cx, cy = obj.center
        r = obj.diameter / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        if obj.shape == "circle":
            draw.ellipse(box, fill=obj.rgb)
        elif obj.shape == "ring":
            draw.ellipse(box, outline=obj.rgb, width=max(2, round(obj.diameter * 0.18)))
        else:
            draw.polygon(_polygon(obj, _UNIT_SHAPES[obj.shape]), fill=obj.rgb)
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, _NOISE_SIGMA, size=(scene.image_size,) * 2 + (3,))
    pixels = np.clip(np.asarray(canvas, dtype=np.float32) + noise, 0, 255)
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def demo_taxonomy() -> Taxonomy:
    return Taxonomy(tuple(ClassSpec(name) for name in CLASS_NAMES), PROMPT_TEMPLATES)


def _manifest_csv(rows: Sequence[tuple[str, str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("path", "labels", "caption"))
    writer.writerows(rows)
    return buffer.getvalue()


def _prepare_target(root: Path) -> None:
    """Refuse to replace a folder that is not a demo world: the whole folder is swapped on success."""
    if not root.exists():
        return
    if root.is_dir() and ((root / "world.json").is_file() or not any(root.iterdir())):
        return
    raise FileExistsError(f"{root} exists and is not a demo world; choose an empty or new folder")


def generate_demo_world(
    out_dir: str | Path, *, n_images: int = 2000, image_size: int = 64, seed: int = 0, first_index: int = 0
) -> DemoWorld:
    """Write a complete demo world to `out_dir`, replacing a previous one only once the new one is whole.

    `first_index` starts the world further along the same sequence of images: a world of images 3000..3499 is a
    later batch of new photos for a project whose first batch was images 0..2999.
    """
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    if not isinstance(first_index, int) or first_index < 0:
        raise ValueError(f"first_index must be a non-negative integer, got {first_index!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    _check_image_size(image_size)
    root = Path(out_dir)
    _prepare_target(root)
    rows = []
    label_counts = Counter({name: 0 for name in CLASS_NAMES})
    with atomic_directory(root) as staging:
        staging.chmod(0o755)  # the staging folder is created private; the world is ordinary shared data
        images_dir = staging / "images"
        images_dir.mkdir()
        for index in range(first_index, first_index + n_images):
            scene = scene_for(seed, index, image_size)
            labels = labels_for(scene)
            label_counts.update(labels)
            name = f"img_{index:06d}.png"
            render(scene).save(images_dir / name, format="PNG")
            rows.append((f"images/{name}", "|".join(labels), caption_for(scene, _rng(seed, index, 1))))
        save_taxonomy(demo_taxonomy(), staging / "taxonomy.yaml")
        atomic_write_text(staging / "manifest.csv", _manifest_csv(rows))
        atomic_write_json(
            staging / "world.json",
            {
                "generator": "mumic_ml.demo_world",
                "generator_version": GENERATOR_VERSION,
                "seed": seed,
                "n_images": n_images,
                "first_index": first_index,
                "image_size": image_size,
                "classes": list(CLASS_NAMES),
                "held_out_classes": list(HELD_OUT_CLASSES),
                "label_counts": {name: label_counts[name] for name in CLASS_NAMES},
                "label_frequencies": {name: label_counts[name] / n_images for name in CLASS_NAMES},
            },
        )
    return load_demo_world(root)


def load_demo_world(out_dir: str | Path) -> DemoWorld:
    """Describe a world already on disk from its `world.json`, so later steps need not know the generator."""
    root = Path(out_dir)
    meta = read_json(root / "world.json")
    return DemoWorld(
        root=root,
        images_dir=root / "images",
        manifest_path=root / "manifest.csv",
        taxonomy_path=root / "taxonomy.yaml",
        world_path=root / "world.json",
        n_images=int(meta["n_images"]),
        class_names=tuple(meta["classes"]),
        held_out_classes=tuple(meta["held_out_classes"]),
    )
