"""How each pipeline step's cost grows with the number of images: nothing may be quadratic.

For each size a fresh project folder gets a demo world of that many images as its one incoming batch, and the steps
users run (`mumic_ml.steps`, in the order of `retrain_job`) each run in a fresh process: ingest, validate (the Great
Expectations suite), split (with the leakage check), the preprocessing cache warm-up (what training's set-up builds
for the train split on a cold cache), one training epoch of mumic-tiny from random initialisation (no pretraining,
which would dominate), evaluation on the test split, and tagging the test images. A fresh process per step keeps one
step's memory out of the next one's peak. Each step measures itself after its imports, so interpreter and library
start-up (a constant) does not flatten the per-image figures; peak RSS is the whole process's. (A child's own peak
is recorded too, but a spawned worker starts as a fork of its parent and keeps the parent's high-water mark, so it
says little.)

Ingest runs twice per size, with `ingest.workers: 2` and `ingest.workers: 0`, alternating which goes first.

    python benchmarks/scale.py --sizes 10000 30000 100000 --out /tmp/scale-bench

The worlds are generated once at the largest size (the demo world's image i does not depend on the world's size)
and each size's batch hard-links the first n images. Results go to OUT/scale.json. An epoch costs far more per
image than any other step; `--train-up-to 10000` trains only up to that size and evaluates and tags the larger ones
with the model trained there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("ingest", "validate", "split", "cache_warmup", "train_epoch", "evaluate", "tag")
# Steps whose memory must follow the manifest's row count, not the images' bytes.
MANIFEST_STEPS = ("ingest", "validate", "split")
WORLD_SEED = 0


def _cpu_seconds() -> float:
    """CPU time of this process and of every child it has waited for (ingest's and the cache's workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory of this process, and of its largest child, in MB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


# --- one step, run in its own process --------------------------------------------------------------------------


def _run_step(name: str, root: Path) -> dict:
    """Import what the step needs, then time the step alone; returns the images it handled and its figures."""
    from mumic_ml.project import Project

    project = Project.load(root)
    work = _prepare(name, project)
    rss_before, _ = _peak_rss_mb()
    cpu, wall = _cpu_seconds(), time.perf_counter()
    n_images = work()
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    own, children = _peak_rss_mb()
    return {
        "images": int(n_images),
        "cpu_s": cpu,
        "wall_s": wall,
        "peak_rss_mb": own,
        "rss_before_mb": rss_before,
        "children_peak_rss_mb": children,
    }


def _prepare(name: str, project):
    """The step as a closure, with its modules imported and its inputs read, so the clock sees the work only."""
    from mumic_ml import steps

    if name == "ingest":
        import mumic_ml.ingest  # noqa: F401

        return lambda: steps.ingest_step(project).n_images
    if name == "validate":
        import mumic_ml.pipeline.validate  # noqa: F401

        return lambda: steps.validate_step(project).counts["images"]
    if name == "split":
        import mumic_ml.pipeline.validate  # noqa: F401
        import mumic_ml.split  # noqa: F401

        def split() -> int:
            report = steps.split_step(project)
            steps.validate_splits_step(project)
            return report["n_images"]

        return split
    if name == "cache_warmup":
        return _cache_warmup(project)
    if name == "train_epoch":
        import mumic_ml.pipeline.tracking  # noqa: F401
        from mumic_ml.train import TrainResult  # noqa: F401

        def train() -> int:
            steps.train_step(project, progress=False)
            return _split_size(project, "train")

        return train
    if name == "evaluate":
        import mumic_ml.evaluate  # noqa: F401
        import mumic_ml.plots  # noqa: F401

        return lambda: steps.evaluate_step(project)["num_images"]
    if name == "tag":
        return _tagging(project)
    raise ValueError(f"unknown step {name!r}")


def _split_size(project, split: str) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(project.split(split)).num_rows


def _cache_warmup(project):
    """What training's set-up does on a cold cache: every train image decoded, resized and cached (then held)."""
    from mumic_ml.backbone import create_backbone
    from mumic_ml.data import CachedImageDataset, label_matrix, read_split
    from mumic_ml.images import PreprocessCache

    size = create_backbone(project.params.model.backbone, None, device="cpu").image_norm.size

    def warm() -> int:
        frame = read_split(project.split("train"))
        targets = label_matrix(frame["labels"], [])
        dataset = CachedImageDataset(frame, project.ingested, targets, PreprocessCache(project.cache), size)
        return len(dataset)

    return warm


def _tagging(project):
    """`mumic_ml.tagging` over the test images, as `mumic tag` runs it; `Predictor` where the module is absent."""
    import importlib.util

    from mumic_ml.data import read_split

    paths = [str(project.ingested / p) for p in read_split(project.split("test"))["path"]]
    if importlib.util.find_spec("mumic_ml.tagging") is not None:
        from mumic_ml.tagging import ImageEntry, tag_images

        entries = [ImageEntry(path, path) for path in paths]
        out = project.reports / "scale_tags.parquet"
        return lambda: tag_images(project.model, entries, out, source="test split", config=project.params.tag).images
    from mumic_ml.predict import Predictor

    cfg = project.params.predict
    predictor = Predictor.from_dir(project.model, batch_size=cfg.batch_size)
    return lambda: len(predictor.predict(paths, top_k=cfg.top_k, threshold=cfg.threshold))


# --- the driver ------------------------------------------------------------------------------------------------


def _world(out: Path, n_images: int, image_size: int) -> Path:
    """The largest world, generated once and reused by later runs with the same size and pixel size."""
    from mumic_ml.demo_world import generate_demo_world

    root = out / "world"
    meta = root / "world.json"
    if meta.is_file():
        world = json.loads(meta.read_text())
        if world["n_images"] >= n_images and world["image_size"] == image_size and world["seed"] == WORLD_SEED:
            return root
    generate_demo_world(root, n_images=n_images, image_size=image_size, seed=WORLD_SEED)
    return root


def _project(out: Path, world: Path, n_images: int, epochs: int) -> Path:
    """A fresh project whose one batch is the world's first `n_images` images (hard links, not copies)."""
    import yaml

    root = out / f"n{n_images}"
    shutil.rmtree(root, ignore_errors=True)
    batch = root / "data" / "incoming" / "demo"
    (batch / "images").mkdir(parents=True)
    lines = (world / "manifest.csv").read_text().splitlines(keepends=True)[: n_images + 1]
    for line in lines[1:]:
        name = line.split(",", 1)[0]
        os.link(world / name, batch / name)
    shutil.copy(world / "taxonomy.yaml", batch / "taxonomy.yaml")
    (batch / "manifest.csv").write_text("".join(lines))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["pretrained"] = None
    params["train"]["epochs"] = epochs
    params["mlflow"]["tracking_uri"] = "sqlite:///mlflow.db"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _set_workers(root: Path, workers: int) -> None:
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["workers"] = workers
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _spawn(step: str, root: Path) -> dict:
    """Run one step in a fresh interpreter and collect what it measured."""
    result = root / f".{step}.json"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--step", step, "--project", str(root)]
    subprocess.run([*command, "--result", str(result)], check=True, env=env, cwd=root)
    return json.loads(result.read_text())


def _ingest_side_by_side(root: Path, first: int, workers: int) -> dict[str, dict]:
    """Ingest the batch from scratch with `first` workers, then with the other setting, into the same project."""
    figures = {}
    for count in (first, workers if first == 0 else 0):
        shutil.rmtree(root / "data" / "ingested", ignore_errors=True)
        _set_workers(root, count)
        figures[f"workers_{count}"] = _spawn("ingest", root)
    return figures


def _image_bytes(world: Path, n_images: int) -> dict[str, float]:
    """Bytes of a stored image file and of its decoded pixels: what manifest-bound memory must not grow with."""
    from PIL import Image

    files = sorted((world / "images").iterdir())[: min(n_images, 200)]
    with Image.open(files[0]) as img:
        width, height = img.size
    return {
        "file_bytes_per_image": sum(f.stat().st_size for f in files) / len(files),
        "pixel_bytes_per_image": float(width * height * 3),
    }


def run(
    sizes: list[int],
    out: Path,
    image_size: int = 32,
    epochs: int = 1,
    ingest_workers: int = 2,
    steps: tuple[str, ...] = STEPS,
    train_up_to: int | None = None,
    model: Path | None = None,
) -> dict:
    """The steps (all by default; later ones need the earlier) at every size; returns the figures and their growth,
    also written to OUT/scale.json.

    Sizes above `train_up_to` skip the training epoch, whose cost per image is the optimizer step's, and evaluate
    and tag with the model trained at the largest size that did train, or `model` when none did in this run.
    """
    sizes = sorted(set(sizes))
    steps = tuple(step for step in STEPS if step in steps)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world = _world(out, sizes[-1], image_size)
    results: dict = {
        "sizes": sizes,
        "image_size": image_size,
        "epochs": epochs,
        "cpu_count": os.cpu_count(),
        "generate_s": time.perf_counter() - started,
        **_image_bytes(world, sizes[-1]),
        "steps": {step: {} for step in steps},
        "ingest_workers": {},
        "train_up_to": train_up_to,
    }
    for position, n_images in enumerate(sizes):
        root = _project(out, world, n_images, epochs)
        first = ingest_workers if position % 2 == 0 else 0
        side_by_side = _ingest_side_by_side(root, first, ingest_workers)
        results["ingest_workers"][str(n_images)] = side_by_side
        if "ingest" in steps:
            results["steps"]["ingest"][str(n_images)] = side_by_side["workers_0"]
        for step in steps:
            if step == "ingest":
                continue
            if step == "train_epoch" and train_up_to is not None and n_images > train_up_to:
                if model is None:
                    raise ValueError(f"no model to evaluate at {n_images} images: train a smaller size or pass --model")
                shutil.copytree(model, root / "models" / "mumic")
                continue
            results["steps"][step][str(n_images)] = _spawn(step, root)
            if step == "train_epoch":
                model = root / "models" / "mumic"
        _write(out, results)
        print(f"{n_images} images: done after {time.perf_counter() - started:.0f} s", flush=True)
    _summarise(results)
    results["total_s"] = time.perf_counter() - started
    _write(out, results)
    return results


def _write(out: Path, results: dict) -> None:
    tmp = out / ".scale.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "scale.json")


def _summarise(results: dict) -> None:
    """Per-1k-image costs, their ratio to the smallest size, memory per manifest row, ingest's worker speed-up."""
    for step, by_size in results["steps"].items():
        if not by_size:
            continue
        sizes = [n for n in results["sizes"] if str(n) in by_size]
        base = by_size[str(sizes[0])]
        for figures in by_size.values():
            images = max(figures["images"], 1)
            figures["cpu_s_per_1k"] = 1000 * figures["cpu_s"] / images
            figures["wall_s_per_1k"] = 1000 * figures["wall_s"] / images
            figures["cpu_ratio"] = figures["cpu_s_per_1k"] / (1000 * base["cpu_s"] / max(base["images"], 1))
        if len(sizes) > 1:
            small, large = by_size[str(sizes[0])], by_size[str(sizes[-1])]
            rows = large["images"] - small["images"]
            grown = (large["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 * 1024
            results.setdefault("memory_bytes_per_row", {})[step] = grown / rows if rows else None
    for figures in results["ingest_workers"].values():
        figures["wall_speedup"] = figures["workers_0"]["wall_s"] / figures[f"workers_{_workers(figures)}"]["wall_s"]


def _workers(figures: dict) -> int:
    return max(int(key.split("_")[1]) for key in figures if key.startswith("workers_"))


def table(results: dict) -> str:
    """The figures as a Markdown table, one row per step and size."""
    lines = [
        "| step | project images | images | CPU s / 1k | wall s / 1k | peak RSS MB | CPU / 1k vs smallest |",
        "|---|---|---|---|---|---|---|",
    ]
    for step, by_size in results["steps"].items():
        for n_images, figures in by_size.items():
            lines.append(
                f"| {step} | {int(n_images):,} | {figures['images']:,} | {figures['cpu_s_per_1k']:.3f} "
                f"| {figures['wall_s_per_1k']:.3f} | {figures['peak_rss_mb']:.0f} | {figures['cpu_ratio']:.2f}x |"
            )
    lines += ["", "| images | ingest wall, 0 workers | ingest wall, 2 workers | speed-up |", "|---|---|---|---|"]
    for n_images, figures in results["ingest_workers"].items():
        more = figures[f"workers_{_workers(figures)}"]
        lines.append(
            f"| {int(n_images):,} | {figures['workers_0']['wall_s']:.1f} s | {more['wall_s']:.1f} s "
            f"| {figures['wall_speedup']:.2f}x |"
        )
    per_row = results.get("memory_bytes_per_row", {})
    if per_row:
        lines += ["", "Peak RSS growth per manifest row (smallest to largest size):"]
        lines += [f"- {step}: {per_row[step]:,.0f} bytes" for step in MANIFEST_STEPS if per_row.get(step) is not None]
        lines.append(
            f"- for scale: {results['file_bytes_per_image']:,.0f} bytes per stored image file, "
            f"{results['pixel_bytes_per_image']:,.0f} bytes of decoded pixels"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--image-size", type=int, default=32, help="demo image side in pixels (the generator's least)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--ingest-workers", type=int, default=2, help="compared with ingest.workers: 0")
    parser.add_argument("--out", type=Path, default=Path("/tmp/scale-bench"))
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="a prefix of the pipeline")
    parser.add_argument("--train-up-to", type=int, help="larger sizes evaluate and tag without their own epoch")
    parser.add_argument("--model", type=Path, help="the model those sizes use when no size trained in this run")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--project", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        args.result.write_text(json.dumps(_run_step(args.step, args.project)))
        return None
    results = run(
        args.sizes,
        args.out,
        args.image_size,
        args.epochs,
        args.ingest_workers,
        tuple(args.steps),
        args.train_up_to,
        args.model,
    )
    print(table(results))
    print(f"results: {args.out / 'scale.json'}")
    return results


if __name__ == "__main__":
    main()
