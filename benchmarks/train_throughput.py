"""Training and prediction throughput of MuMIC against a bare open_clip loop doing the same work.

Both sides use the same architecture, the same initial weights, the same uint8 input batch, the same class
prompts and the same tempered-sigmoid BCE with an AdamW update and gradient clipping. The project side runs the
code the trainer runs (`Stepper`, `ImagePreparer`, `MumicClassifier`); the bare side is what a user would write
with open_clip alone (full 77-token prompts, `encode_image` / `encode_text`). Rounds alternate between the two so
that load from other processes hits both alike; the figure that matters is the ratio (goal: >= 0.95).

    python benchmarks/train_throughput.py                       # tiny demo model on CPU
    python benchmarks/train_throughput.py --model ViT-B-32 --batch-size 256 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mumic_ml.backbone import create_backbone
from mumic_ml.config import Params, Precision
from mumic_ml.data import ImagePreparer
from mumic_ml.model_io import build_classifier
from mumic_ml.optim import Stepper, parameter_groups
from mumic_ml.runtime import autocast_and_scaler, resolve_device
from mumic_ml.task import MumicTask, create_loss
from mumic_ml.taxonomy import class_prompts

TEMPLATES = ("a photo of {}.", "an image with {}.", "a picture showing {}.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_project(args, params: Params, prompts, device):
    torch.manual_seed(0)
    backbone = create_backbone(args.model, None)
    classifier = build_classifier(params.model, prompts, backbone)
    task = MumicTask(classifier, create_loss(params.train.loss)).to(device)
    channels_last = params.train.channels_last and device.type == "cuda"
    if channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(parameter_groups(classifier, params), betas=(0.9, 0.98), eps=1e-6)
    autocast, scaler, _ = autocast_and_scaler(params.train.precision, device)
    model = torch.compile(task) if args.compile else task
    stepper = Stepper(model, optimizer, autocast, scaler, 1, params.train.grad_clip_norm)
    preparer = ImagePreparer(backbone.image_norm, device, channels_last)

    def train_step(images_uint8, targets):
        task.train()
        stepper.backward(preparer(images_uint8), targets)
        stepper.update(1.0)

    @torch.inference_mode()
    def predict_step(images_uint8):
        classifier.eval()
        with autocast():
            return torch.sigmoid(classifier(preparer(images_uint8)).logits)

    return train_step, predict_step, backbone.image_norm.size, classifier


def build_bare(args, params: Params, prompts, device):
    """What a user writes with open_clip alone for the same objective."""
    torch.manual_seed(0)
    backbone = create_backbone(args.model, None)
    clip = backbone.clip.to(device)
    flat = [p for group in prompts for p in group]
    tokens = backbone.tokenizer(flat).to(device)
    owner = torch.tensor([c for c, group in enumerate(prompts) for _ in group], device=device)
    n_classes = len(prompts)
    log_inv_t = torch.nn.Parameter(torch.tensor(2.659, device=device))
    optimizer = torch.optim.AdamW(
        [
            {"params": list(clip.visual.parameters()), "lr": params.train.lr_image},
            {
                "params": [p for n, p in clip.named_parameters() if not n.startswith("visual.")],
                "lr": params.train.lr_text,
            },
            {"params": [log_inv_t], "lr": params.train.lr_head, "weight_decay": 0.0},
        ],
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=params.train.weight_decay,
    )
    autocast, scaler, _ = autocast_and_scaler(params.train.precision, device)
    norm = backbone.image_norm
    mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)

    def images_of(batch):
        return (batch.to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std

    def class_matrix():
        text = F.normalize(clip.encode_text(tokens).float(), dim=-1)
        pooled = torch.zeros(n_classes, text.shape[1], device=device).index_add_(0, owner, text)
        return F.normalize(pooled, dim=-1)

    def train_step(images_uint8, targets):
        clip.train()
        with autocast():
            v = F.normalize(clip.encode_image(images_of(images_uint8)).float(), dim=-1)
            logits = (v @ class_matrix().T) * log_inv_t.exp()
            loss = F.binary_cross_entropy_with_logits(logits, targets)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():
        cached = class_matrix()

    @torch.inference_mode()
    def predict_step(images_uint8):
        clip.eval()
        with autocast():
            v = F.normalize(clip.encode_image(images_of(images_uint8)).float(), dim=-1)
            return torch.sigmoid((v @ cached.T) * log_inv_t.exp())

    return train_step, predict_step


def time_alternating(fns: dict, make_args, steps: int, rounds: int, warmup: int, device) -> dict[str, float]:
    """Median seconds per call of each function, in rounds that alternate which one goes first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(*make_args())
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(rounds):
        order = list(fns.items())
        for name, fn in order if round_index % 2 == 0 else reversed(order):
            args = [make_args() for _ in range(steps)]
            _sync(device)
            start = time.perf_counter()
            for a in args:
                fn(*a)
            _sync(device)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in samples.items()}


def count_train_flops(train_step, make_args) -> int:
    with FlopCounterMode(display=False) as counter:
        train_step(*make_args())
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mumic-tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=31)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=[p.value for p in Precision])
    parser.add_argument("--compile", action="store_true", help="torch.compile the project's step")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    device = resolve_device(args.device)
    # The work the bare loop does, whatever params.yaml's defaults: both towers tuned, the paper's loss, no residual.
    params = Params().updated(
        {
            "model.backbone": args.model,
            "model.freeze_text": False,
            "model.class_residual": False,
            "train.loss": "tempered_sigmoid_bce",
            "train.precision": args.precision,
        }
    )
    prompts = [class_prompts(f"class number {i}", TEMPLATES) for i in range(args.classes)]

    project_train, project_predict, size, classifier = build_project(args, params, prompts, device)
    bare_train, bare_predict = build_bare(args, params, prompts, device)
    generator = torch.Generator().manual_seed(0)

    def batch():
        images = torch.randint(0, 256, (args.batch_size, size, size, 3), dtype=torch.uint8, generator=generator)
        targets = (torch.rand(args.batch_size, args.classes, generator=generator) < 0.1).float().to(device)
        return images, targets

    train_times = time_alternating(
        {"mumic": project_train, "bare_open_clip": bare_train}, batch, args.steps, args.rounds, args.warmup, device
    )
    predict_times = time_alternating(
        {"mumic": project_predict, "bare_open_clip": bare_predict},
        lambda: (batch()[0],),
        args.steps,
        args.rounds,
        args.warmup,
        device,
    )
    flops = count_train_flops(project_train, batch)
    cpu_name = f"cpu ({torch.get_num_threads()} threads)"
    figures = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
        "model": args.model,
        "image_size": size,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "train_images_per_s": {k: args.batch_size / v for k, v in train_times.items()},
        "train_ratio": train_times["bare_open_clip"] / train_times["mumic"],
        "predict_images_per_s": {k: args.batch_size / v for k, v in predict_times.items()},
        "predict_ratio": predict_times["bare_open_clip"] / predict_times["mumic"],
        "train_tflops_per_s": flops / train_times["mumic"] / 1e12,
        "train_gflops_per_image": flops / args.batch_size / 1e9,
    }
    print(f"{figures['model']} @ {size}px, batch {args.batch_size}, {args.precision}, {figures['device']}")
    print(f"{'':24}{'mumic':>12}{'bare open_clip':>16}{'ratio':>8}")
    for kind in ("train", "predict"):
        ours, bare = figures[f"{kind}_images_per_s"]["mumic"], figures[f"{kind}_images_per_s"]["bare_open_clip"]
        print(f"{kind + ' images/s':24}{ours:12.1f}{bare:16.1f}{figures[kind + '_ratio']:8.3f}")
    print(
        f"training: {figures['train_gflops_per_image']:.2f} GFLOP/image (counted), "
        f"{figures['train_tflops_per_s']:.3f} TFLOP/s achieved"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
