"""`mumic tag` end to end against the bare model forward pass on the same images, side by side in one run.

The tag side is `tagging.tag_images`, what `mumic tag` runs after parsing its flags: it loads the model directory,
lists the image files on disk, decodes them in worker processes, scores them and commits Parquet parts, then
combines them. The bare side is the same model's forward pass (image tower and class head, sigmoid) on the same
images already decoded into uint8 batches of the same size, with nothing else to do. Rounds alternate which side
goes first, so that load from other processes hits both alike; the ratio is the figure that matters (goal: >= 0.8).

The bare side runs each batch on all of torch's threads; the tag side splits them into lanes (`tagging._Lanes`),
a batch per thread. On a loaded machine the bare side's split batches wait at a barrier for every operation and
collapse (a quarter of their one-thread speed), so the ratio there says more about the load than about tagging;
`--threads 1` compares one lane with one thread.

    python benchmarks/tag_throughput.py                              # mumic-tiny (untrained), 4000 demo photos
    python benchmarks/tag_throughput.py --model models/mumic --workers 2 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

# torch and mumic_ml are imported inside the functions: the decoding workers are spawned, and a spawned process
# first imports its parent's main script, so imports up here would be paid again by every worker at its start.


def photo_folder(root: Path, n_images: int, distinct: int, image_size: int) -> Path:
    """`n_images` files on disk: `distinct` demo photos, hard-linked again under new names to reach the count."""
    from mumic_ml.demo_world import generate_demo_world

    world = generate_demo_world(root / "world", n_images=distinct, image_size=image_size, seed=0)
    sources = sorted((world.root / "images").glob("*.png"))
    photos = root / "photos"
    for i in range(n_images):
        target = photos / f"{i // 1000:03d}" / f"photo_{i:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], target)
    return photos


def untrained_model(root: Path, backbone_name: str, taxonomy_path: Path) -> Path:
    """Random weights: throughput does not depend on what the model has learned."""
    from mumic_ml.config import Params
    from mumic_ml.pretrain import export_zero_shot

    params = Params().updated({"model.backbone": backbone_name})
    return export_zero_shot(params, taxonomy_path=taxonomy_path, backbone_weights=None, model_dir=root / "model")


def bare_forward(model_dir: Path, photos: Path, batch_size: int):
    """The model alone, on the photos decoded beforehand: seconds for one pass over all of them."""
    import numpy as np
    import torch

    from mumic_ml.image_batches import read_image
    from mumic_ml.predict import Predictor
    from mumic_ml.tagging import list_images

    predictor = Predictor.from_dir(model_dir)
    size = predictor.model.image_norm.size
    pixels = torch.from_numpy(np.stack([read_image(entry.path, size) for entry in list_images(photos)]))
    batches = list(pixels.split(batch_size))
    classifier = predictor.model.classifier

    @torch.no_grad()
    def one_pass() -> float:
        started = time.perf_counter()
        for batch in batches:
            torch.sigmoid(classifier(predictor.preparer(batch)).logits)
        return time.perf_counter() - started

    return one_pass, len(pixels)


def main() -> None:
    import torch

    from mumic_ml.config import TagConfig
    from mumic_ml.tagging import MAX_LANES, decoding_workers, list_images, tag_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: an untrained --backbone model)")
    parser.add_argument("--backbone", default="mumic-tiny")
    parser.add_argument("--images", type=int, default=4000, help="image files on disk")
    parser.add_argument("--distinct", type=int, default=500, help="distinct demo photos among them")
    parser.add_argument("--image-size", type=int, default=64, help="side of the demo photos in pixels")
    parser.add_argument("--batch-size", type=int, default=TagConfig().batch_size)
    parser.add_argument("--workers", type=int, help="decoding processes (default: tag.workers' default on a CPU)")
    parser.add_argument("--threads", type=int, help="torch threads of this process, both sides (default: torch's)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="tag-throughput-") as tmp:
        root = Path(tmp)
        photos = photo_folder(root, args.images, args.distinct, args.image_size)
        model_dir = (
            Path(args.model) if args.model else untrained_model(root, args.backbone, root / "world" / "taxonomy.yaml")
        )
        one_bare_pass, n_images = bare_forward(model_dir, photos, args.batch_size)
        config = TagConfig(batch_size=args.batch_size, workers=args.workers)
        workers = decoding_workers(config.workers, torch.device("cpu"))

        (root / "no-photos").mkdir()

        def one_tag_pass(folder: Path = photos) -> float:
            out = root / "out" / "tags.parquet"
            shutil.rmtree(out.parent, ignore_errors=True)
            started = time.perf_counter()
            tag_images(model_dir, list_images(folder), out, source=str(folder), config=config)
            return time.perf_counter() - started

        one_bare_pass()  # warm-up: first-call allocations, the page cache for the tag side's files
        one_tag_pass()
        seconds: dict[str, list[float]] = {"tag": [], "bare": [], "tag_start_up": []}
        for round_index in range(args.rounds):
            order = [("tag", one_tag_pass), ("bare", one_bare_pass)]
            for name, one_pass in order if round_index % 2 == 0 else reversed(order):
                seconds[name].append(one_pass())
            # What a run costs before its first photo and after its last: model, workers, combining the parts.
            seconds["tag_start_up"].append(one_tag_pass(root / "no-photos"))

    median = {name: statistics.median(values) for name, values in seconds.items()}
    per_s = {"tag": n_images / median["tag"], "bare": n_images / median["bare"]}
    per_s["tag_after_start_up"] = n_images / max(median["tag"] - median["tag_start_up"], 1e-9)
    figures = {
        "device": f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)",
        "tag_lanes": min(torch.get_num_threads(), MAX_LANES),
        "model": args.model or f"{args.backbone} (untrained)",
        "images": n_images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": workers,
        "tag_images_per_s": per_s["tag"],
        "bare_images_per_s": per_s["bare"],
        "ratio": per_s["tag"] / per_s["bare"],
        "tag_start_up_s": median["tag_start_up"],
        "tag_images_per_s_after_start_up": per_s["tag_after_start_up"],
        "ratio_after_start_up": per_s["tag_after_start_up"] / per_s["bare"],
        "seconds": seconds,
    }
    print(
        f"{figures['model']}, {n_images} photos of {args.image_size} px on disk, batch {args.batch_size}, "
        f"{workers} decoding worker(s), {figures['device']}, {figures['tag_lanes']} tag lane(s)"
    )
    print(f"{'mumic tag (end to end)':28}{per_s['tag']:10.1f} images/s")
    print(f"{'bare forward (decoded)':28}{per_s['bare']:10.1f} images/s")
    print(f"{'ratio':28}{figures['ratio']:10.3f}")
    print(
        f"start-up of a tag run {median['tag_start_up']:.2f} s; without it {per_s['tag_after_start_up']:.1f} images/s, "
        f"ratio {figures['ratio_after_start_up']:.3f}"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
