"""Training end to end on a tiny demo world: it learns, it resumes exactly, it runs under DDP."""

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mumic_ml.checkpoint import latest_checkpoint
from mumic_ml.config import Params
from mumic_ml.data import batch_seed, epoch_batches, label_matrix, read_split
from mumic_ml.evaluate import evaluate_model
from mumic_ml.io import atomic_write_json, read_json
from mumic_ml.metrics import gap_at_k
from mumic_ml.optim import LrSchedule, lr_factor, parameter_groups
from mumic_ml.train import train

FAST = {"train.batch_size": 16, "train.epochs": 2, "train.early_stopping_patience": None}


def _params(**overrides):
    return Params().updated({**FAST, **overrides})


def _train(world, tmp_path, params, model="model", **kwargs):
    return train(
        params,
        splits_dir=world.splits,
        images_root=world.ingested,
        taxonomy_path=world.taxonomy,
        run_dir=tmp_path / "run",
        model_dir=tmp_path / model,
        cache_dir=world.cache,
        progress=False,
        **kwargs,
    )


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_lr_schedule_of_a_run_takes_its_warmup_as_a_fraction_of_the_steps():
    schedule = LrSchedule(total_steps=100, warmup_fraction=0.1, min_fraction=0.1)
    assert schedule.warmup_steps == 10
    assert [schedule(step) for step in (0, 9, 55, 100)] == [lr_factor(s, 100, 10, 0.1) for s in (0, 9, 55, 100)]
    assert LrSchedule(total_steps=7, warmup_fraction=0.5, min_fraction=0.0).warmup_steps == 3


def test_batch_seeds_keep_the_numbers_of_runs_already_made():
    """Batch order and flips of existing runs (and their exact resume) depend on these exact values."""
    assert batch_seed(0, 0) == 0
    assert batch_seed(3, 2) == 3_000_011
    assert batch_seed(3, 2, batch=5) == 3_000_020_000_038
    assert batch_seed(3, 2, batch=0) != batch_seed(3, 2)
    assert len({batch_seed(1, epoch, batch=b) for epoch in range(3) for b in range(50)}) == 150


def test_epoch_batches_are_a_pure_function_of_seed_and_epoch():
    a = epoch_batches(50, 8, seed=1, epoch=3)
    assert a == epoch_batches(50, 8, seed=1, epoch=3)
    assert a != epoch_batches(50, 8, seed=1, epoch=4)
    assert all(len(b) == 8 for b in a) and len(a) == 6
    ranks = [epoch_batches(50, 8, seed=1, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))
    assert sum(epoch_batches(50, 8, seed=0, epoch=0, shuffle=False), []) == list(range(50))


def test_parameter_groups_separate_towers_and_skip_decay_on_1d(tiny_world):
    from mumic_ml.backbone import create_backbone
    from mumic_ml.model_io import build_classifier

    params = _params(**{"model.freeze_text": False})
    backbone = create_backbone("mumic-tiny", None)
    model = build_classifier(params.model, [["a"], ["b"]], backbone)
    groups = {g["name"]: g for g in parameter_groups(model, params)}
    towers = ("image", "text", "head")
    assert set(groups) == {f"{tower}_{decay}" for tower in towers for decay in ("decay", "no_decay")}
    assert groups["head_no_decay"]["params"] == [model.log_inv_temperature]
    # The class residual decays towards zero, i.e. towards the class's text embedding.
    assert groups["head_decay"]["params"] == [model.class_residual]
    assert groups["head_decay"]["peak_lr"] == params.train.lr_head
    assert groups["image_no_decay"]["weight_decay"] == 0.0 and groups["image_decay"]["weight_decay"] == 0.05
    assert all(p.ndim < 2 for g in groups.values() if "no_decay" in g["name"] for p in g["params"])
    assert groups["text_decay"]["peak_lr"] == params.train.lr_text


def test_the_default_frozen_text_tower_has_no_parameter_group(tiny_world):
    from mumic_ml.backbone import create_backbone
    from mumic_ml.model_io import build_classifier

    params = _params()
    assert params.model.freeze_text
    backbone = create_backbone("mumic-tiny", None)
    model = build_classifier(params.model, [["a"], ["b"]], backbone)
    names = {g["name"] for g in parameter_groups(model, params)}
    assert names == {"image_decay", "image_no_decay", "head_decay", "head_no_decay"}


def _evaluate(world, tmp_path):
    return evaluate_model(
        tmp_path / "model",
        world.splits / "test.parquet",
        world.ingested,
        tmp_path / "metrics.json",
        cache_dir=world.cache,
    )


def test_training_writes_a_loadable_model_with_history(tiny_world, tmp_path):
    result = _train(tiny_world, tmp_path, _params(**{"evaluate.k": 5}))
    assert result.epochs_run == 2 and len(result.history) == 2
    assert (tmp_path / "model" / "model.safetensors").is_file()
    # Validation GAP is named by what it holds: GAP@k at k = evaluate.k, with that k recorded beside it.
    assert result.gap_k == 5
    assert result.best_val_gap_at_k == max(entry["val_gap_at_k"] for entry in result.history)
    written = read_json(tmp_path / "run" / "result.json")
    assert written["gap_k"] == 5 and written["best_val_gap_at_k"] == result.best_val_gap_at_k
    assert [entry["val_gap_at_k"] for entry in written["history"]] == [e["val_gap_at_k"] for e in result.history]
    metadata = read_json(tmp_path / "model" / "model.json")["metadata"]
    assert (metadata["gap_k"], metadata["best_val_gap_at_k"]) == (5, result.best_val_gap_at_k)
    report = _evaluate(tiny_world, tmp_path)
    for key in ("gap_at_10", "gap", "map_macro", "per_class_ap"):
        assert key in report
    assert 0.0 <= report["gap_at_10"] <= 1.0


def test_held_out_classes_are_removed_from_training_and_scored_zero_shot(tiny_world, tmp_path):
    params = _params(**{"train.epochs": 1, "train.held_out_classes": ["red circle"]})
    _train(tiny_world, tmp_path, params)
    report = _evaluate(tiny_world, tmp_path)
    assert "red circle" not in report["per_class_ap"]
    assert report["zero_shot"]["classes"] == ["red circle"]
    assert 0.0 <= report["zero_shot"]["map_held_out"] <= 1.0


def test_unknown_held_out_class_is_an_error(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="not in the taxonomy"):
        _train(tiny_world, tmp_path, _params(**{"train.held_out_classes": ["purple unicorn"]}))


@pytest.mark.slow
def test_training_learns_far_above_random_and_class_prior(tmp_path_factory, tmp_path):
    from conftest import build_tiny_world

    world = build_tiny_world(tmp_path_factory.mktemp("learn_world"), n_images=600)
    _train(world, tmp_path, Params().updated({"train.epochs": 6, "train.batch_size": 32}))
    report = _evaluate(world, tmp_path)
    frame = read_split(world.splits / "test.parquet")
    targets = label_matrix(frame["labels"], list(report["per_class_ap"]))
    rng = np.random.default_rng(0)
    random_gap = np.mean([gap_at_k(rng.random(targets.shape), targets) for _ in range(5)])
    train_targets = label_matrix(read_split(world.splits / "train.parquet")["labels"], list(report["per_class_ap"]))
    prior = np.tile(train_targets.mean(0), (len(targets), 1)) + rng.random(targets.shape) * 1e-6
    prior_gap = gap_at_k(prior, targets)
    assert report["gap_at_10"] > 2 * random_gap
    assert report["gap_at_10"] > prior_gap + 0.1, (report["gap_at_10"], prior_gap)


@pytest.mark.slow
def test_resume_starts_fresh_from_a_checkpoint_of_another_configuration(tiny_world, tmp_path):
    first = _train(tiny_world, tmp_path, _params(**{"train.epochs": 1}))
    assert first.resumed_from is None
    same = _train(tiny_world, tmp_path, _params(**{"train.epochs": 1}), resume=True)
    assert same.resumed_from is not None
    other = _train(tiny_world, tmp_path, _params(**{"train.epochs": 1, "train.lr_image": 0.1}), resume=True)
    assert other.resumed_from is None and other.epochs_run == 1


@pytest.mark.slow
def test_resume_starts_fresh_when_validation_k_changes(tiny_world, tmp_path):
    """The best epoch and early stopping compare GAP@k across epochs, so a run keeps one k from start to end."""
    _train(tiny_world, tmp_path, _params(**{"train.epochs": 1}))
    other_k = _train(tiny_world, tmp_path, _params(**{"train.epochs": 1, "evaluate.k": 5}), resume=True)
    assert other_k.resumed_from is None and other_k.gap_k == 5


@pytest.mark.slow
def test_a_checkpoint_with_another_progress_record_starts_a_fresh_run_and_says_why(tiny_world, tmp_path, caplog):
    """What a checkpoint written before the validation metric was named by its k looks like: `best_val_gap_at_10`."""
    params = _params(**{"train.epochs": 1})
    _train(tiny_world, tmp_path, params)
    state_path = latest_checkpoint(tmp_path / "run") / "state.json"
    stored = read_json(state_path)
    stored["train_state"]["best_val_gap_at_10"] = stored["train_state"].pop("best_val_gap_at_k")
    atomic_write_json(state_path, stored)
    with caplog.at_level(logging.WARNING, logger="mumic_ml.train"):
        again = _train(tiny_world, tmp_path, params, resume=True)
    assert again.resumed_from is None and again.epochs_run == 1
    assert "another version of mumic" in caplog.text
    assert "best_val_gap_at_10, best_val_gap_at_k" in caplog.text


def test_only_the_callers_of_train_import_the_training_loop():
    """Helpers live in runtime, optim, data, taxonomy and label_noise; the loop module exports the loop only."""
    root = Path(__file__).resolve().parents[1]
    allowed = {"train", "TrainResult", "EpochReport"}
    offending = []
    folders = ("mumic_ml", "mumic_dagster", "benchmarks", "tests")
    for path in sorted(p for folder in folders for p in (root / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mumic_ml.train":
                offending += [f"{path.name}: {a.name}" for a in node.names if a.name not in allowed]
            elif isinstance(node, ast.Import):
                offending += [f"{path.name}: {a.name}" for a in node.names if a.name == "mumic_ml.train"]
    assert offending == []


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_world, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "mumic_ml",
        "train",
        "--no-progress",
        "--splits",
        str(tiny_world.splits),
        "--images-root",
        str(tiny_world.ingested),
        "--taxonomy",
        str(tiny_world.taxonomy),
        "--cache-dir",
        str(tiny_world.cache),
        "--run-dir",
        str(tmp_path / "run"),
        "--model-dir",
        str(tmp_path / "model"),
        "--set",
        "model.pretrained=null",
        "--set",
        "train.batch_size=8",
        "--set",
        "train.epochs=1",
        "--set",
        "train.device=cpu",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
    metadata = json.loads((tmp_path / "model" / "model.json").read_text())["metadata"]
    assert metadata["world_size"] == 2


def _tiny_task(seed=0):
    from mumic_ml.backbone import create_backbone
    from mumic_ml.model_io import build_classifier
    from mumic_ml.task import MumicTask, create_loss

    torch.manual_seed(seed)
    params = _params()
    backbone = create_backbone("mumic-tiny", None)
    model = build_classifier(params.model, [["a red circle."], ["a blue square."], ["stripes."]], backbone)
    task = MumicTask(model, create_loss(params.train.loss))
    optimizer = torch.optim.AdamW(parameter_groups(model, params))
    return task, optimizer


def test_gradient_accumulation_matches_one_large_batch():
    """Two micro-batches of 4 with accumulation_steps=2 accumulate the gradient of one batch of 8."""
    import contextlib

    from mumic_ml.optim import Stepper

    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=g)
    targets = (torch.rand(8, 3, generator=g) < 0.4).float()
    big_task, big_opt = _tiny_task()
    Stepper(big_task, big_opt, contextlib.nullcontext, None, 1, 1.0).backward(images, targets)
    acc_task, acc_opt = _tiny_task()
    stepper = Stepper(acc_task, acc_opt, contextlib.nullcontext, None, 2, 1.0)
    stepper.backward(images[:4], targets[:4], sync_gradients=False)
    stepper.backward(images[4:], targets[4:])
    pairs = [(a.grad, b.grad) for a, b in zip(big_task.parameters(), acc_task.parameters()) if a.grad is not None]
    assert pairs
    for a, b in pairs:
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    stepper.update(0.5)
    assert all(p.grad is None for p in acc_task.parameters())
    assert acc_opt.param_groups[0]["lr"] == pytest.approx(0.5 * acc_opt.param_groups[0]["peak_lr"])


def test_precision_choice_on_cpu():
    from mumic_ml.config import Precision
    from mumic_ml.runtime import autocast_and_scaler

    cpu = torch.device("cpu")
    assert autocast_and_scaler(Precision.AUTO, cpu)[1:] == (None, "fp32")
    assert autocast_and_scaler(Precision.BF16, cpu)[2] == "bf16"
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA"):
        autocast_and_scaler(Precision.FP16, cpu)


def test_image_preparer_normalises_and_flips_deterministically():
    from mumic_ml.backbone import ImageNorm
    from mumic_ml.data import ImagePreparer

    prep = ImagePreparer(ImageNorm(4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), torch.device("cpu"))
    images = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    images[:, :, 0] = 0  # left column black
    out = prep(images)
    assert out.shape == (2, 3, 4, 4)
    assert out[0, 0, 0, 0].item() == pytest.approx(-2.0) and out[0, 0, 0, 1].item() == pytest.approx(2.0)
    first = prep(images, torch.Generator().manual_seed(5))
    again = prep(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    flipped = [bool(first[i, 0, 0, 3] < 0) for i in range(2)]
    assert all(f or bool(first[i, 0, 0, 0] < 0) for i, f in enumerate(flipped))
