"""Contrastive pretraining of the demo foundation model and the zero-shot export, on the tiny demo world."""

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mumic_ml.backbone import BackboneError, create_backbone
from mumic_ml.cli import main
from mumic_ml.config import DEMO_FOUNDATION, ConfigError, Params, params_from_dict
from mumic_ml.evaluate import evaluate_model
from mumic_ml.model_io import load_model_dir
from mumic_ml.pretrain import export_zero_shot, label_caption, pretrain, split_captions
from mumic_ml.project import Project
from mumic_ml.steps import foundation_step

FAST = {"pretrain.batch_size": 16, "pretrain.epochs": 1, "pretrain.device": "cpu"}


def _params(**overrides):
    return Params().updated({**FAST, **overrides})


def _pretrain(world, out_path, params, splits=None):
    return pretrain(
        params,
        splits_dir=splits or world.splits,
        images_root=world.ingested,
        cache_dir=world.cache,
        out_path=out_path,
        progress=False,
    )


@pytest.fixture(scope="module")
def foundation(tiny_world, tmp_path_factory):
    return _pretrain(tiny_world, tmp_path_factory.mktemp("foundation") / "tiny.safetensors", _params())


def test_checkpoint_loads_through_the_backbone_factory(foundation):
    written = load_file(foundation.out_path)
    loaded = create_backbone("mumic-tiny", str(foundation.out_path)).clip.state_dict()
    assert set(written) == set(loaded)
    assert all(torch.equal(written[k], loaded[k]) for k in written)
    random_init = create_backbone("mumic-tiny", None).clip.state_dict()
    assert not all(torch.equal(written[k], random_init[k]) for k in written)

    meta = json.loads(foundation.meta_path.read_text())
    assert meta["backbone"] == "mumic-tiny" and meta["captions_from"] == "caption column"
    assert meta["pretrain"]["batch_size"] == 16 and meta["epochs"] == 1
    assert meta["data_fingerprint"] == foundation.data_fingerprint
    assert math.isfinite(meta["final_loss"]) and 0.0 <= meta["val_retrieval_top1"] <= 1.0
    assert {"train_loss", "val_retrieval_top1", "logit_scale", "images_per_second"} <= set(meta["history"][0])


@pytest.mark.slow  # pretrains anew: the module's shared foundation cannot stand in
def test_same_seed_writes_identical_files_and_another_seed_does_not(tiny_world, tmp_path, foundation):
    again = _pretrain(tiny_world, tmp_path / "again.safetensors", _params())
    assert again.out_path.read_bytes() == foundation.out_path.read_bytes()
    other = _pretrain(tiny_world, tmp_path / "other.safetensors", _params(**{"pretrain.seed": 1}))
    assert other.out_path.read_bytes() != foundation.out_path.read_bytes()


@pytest.mark.slow  # pretrains anew: the module's shared foundation cannot stand in
def test_contrastive_loss_decreases(tiny_world, tmp_path):
    result = _pretrain(tiny_world, tmp_path / "w.safetensors", _params(**{"pretrain.epochs": 4}))
    losses = [entry["train_loss"] for entry in result.history]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.2
    assert losses[-1] < math.log(16)  # below chance for a batch of 16


@pytest.mark.slow  # pretrains anew: the module's shared foundation cannot stand in
def test_siglip_option_learns_a_bias_and_keeps_the_architecture(tiny_world, tmp_path):
    result = _pretrain(tiny_world, tmp_path / "s.safetensors", _params(**{"pretrain.loss": "siglip"}))
    assert math.isfinite(result.final_loss)
    assert result.history[0]["logit_bias"] != -10.0
    assert "logit_bias" not in load_file(result.out_path)
    create_backbone("mumic-tiny", str(result.out_path))


def test_split_without_captions_falls_back_to_label_captions(tiny_world, tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    for name in ("train", "val"):
        frame = pd.read_parquet(tiny_world.splits / f"{name}.parquet")
        assert "caption" in frame.columns
        frame.drop(columns="caption").to_parquet(splits / f"{name}.parquet")
    result = _pretrain(tiny_world, tmp_path / "w.safetensors", _params(), splits=splits)
    assert json.loads(result.meta_path.read_text())["captions_from"] == "labels"
    assert label_caption(["red", "circle", "striped background"]) == "a photo of red, circle and striped background."
    assert label_caption(["circle"]) == "a photo of circle."


def test_a_row_without_a_caption_gets_its_label_caption():
    """An image its dataset left uncaptioned, or a batch without captions combined with one that has them."""
    captions = ["two pets", None, float("nan"), " "]
    labels = [["cat", "dog"], ["dog"], ["red", "circle"], []]
    expected = ["two pets", "a photo of dog.", "a photo of red and circle.", "a photo."]
    assert split_captions(pd.DataFrame({"caption": captions, "labels": labels})) == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("loss", "triplet"),
        ("batch_size", 1),
        ("epochs", 0),
        ("lr", 0),
        ("warmup_fraction", 1.0),
        ("device", "tpu"),
        ("precision", "fp8"),
        ("typo", 1),
    ],
)
def test_bad_pretrain_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"pretrain.{key}"):
        params_from_dict({"pretrain": {key: value}})


def test_batch_larger_than_the_train_split_is_an_error(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="fewer than pretrain.batch_size"):
        _pretrain(tiny_world, tmp_path / "w.safetensors", _params(**{"pretrain.batch_size": 10_000}))


def test_zero_shot_export_evaluates_and_scores_held_out_classes(tiny_world, tmp_path, foundation):
    params = _params(**{"train.held_out_classes": ["red triangle"]})
    model_dir = export_zero_shot(
        params, taxonomy_path=tiny_world.taxonomy, backbone_weights=foundation.out_path, model_dir=tmp_path / "zs"
    )
    loaded = load_model_dir(model_dir)
    assert loaded.metadata["zero_shot"] is True and loaded.metadata["held_out_classes"] == ["red triangle"]
    assert "red triangle" not in loaded.class_names and loaded.thresholds is None
    written = load_file(foundation.out_path)
    clip_state = loaded.classifier.clip.state_dict()
    assert all(torch.equal(written[k], clip_state[k]) for k in written)

    report = evaluate_model(
        model_dir,
        tiny_world.splits / "test.parquet",
        tiny_world.ingested,
        tmp_path / "m.json",
        cache_dir=tiny_world.cache,
    )
    assert 0.0 <= report["gap_at_10"] <= 1.0
    assert report["zero_shot"]["classes"] == ["red triangle"]


def test_random_init_export_is_seeded(tiny_world, tmp_path):
    paths = [
        export_zero_shot(_params(), taxonomy_path=tiny_world.taxonomy, backbone_weights=None, model_dir=tmp_path / d)
        / "model.safetensors"
        for d in ("a", "b")
    ]
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_zero_shot_needs_the_mumic_head(tiny_world, tmp_path):
    params = _params(**{"model.head": "linear", "train.loss": "bce"})
    with pytest.raises(ValueError, match="needs model.head 'mumic'"):
        export_zero_shot(params, taxonomy_path=tiny_world.taxonomy, backbone_weights=None, model_dir=tmp_path / "zs")


def _project(world, tmp_path, **overrides) -> Project:
    """A project whose paths point into the tiny world, with the demo foundation written under tmp_path."""
    params = _params(
        **{
            "model.pretrained": DEMO_FOUNDATION,
            "train.held_out_classes": ["red triangle"],
            "paths.splits": str(world.splits),
            "paths.ingested": str(world.ingested),
            "paths.cache": str(world.cache),
            "paths.taxonomy": str(world.taxonomy),
            "paths.foundation": str(tmp_path / "foundation"),
            **overrides,
        }
    )
    return Project(params, tmp_path)


@pytest.mark.slow
def test_foundation_step_pretrains_once_then_reuses_until_config_or_data_change(tiny_world, tmp_path, monkeypatch):
    project = _project(tiny_world, tmp_path)
    first = foundation_step(project, progress=False)
    checkpoint = tmp_path / "foundation" / "mumic-tiny.safetensors"
    assert first.source == "pretrained" and first.weights == str(checkpoint)
    assert project.foundation_weights() == str(checkpoint)
    assert 0.0 <= first.zero_shot["gap_at_10"] <= 1.0
    assert first.zero_shot["held_out"]["classes"] == ["red triangle"]
    report = json.loads(first.report_path.read_text())
    assert report["source"] == "pretrained" and report["pretrained"] == DEMO_FOUNDATION
    assert report["zero_shot_test"]["gap_at_10"] == first.zero_shot["gap_at_10"]

    pretrain_calls, exports = [], []
    monkeypatch.setattr("mumic_ml.pretrain.pretrain", lambda *a, **k: pretrain_calls.append(k) or pretrain(*a, **k))
    monkeypatch.setattr(
        "mumic_ml.pretrain.export_zero_shot", lambda *a, **k: exports.append(k) or export_zero_shot(*a, **k)
    )
    written = checkpoint.read_bytes()
    cached = foundation_step(project, progress=False)
    assert cached.source == "cached" and not pretrain_calls
    assert cached.zero_shot == first.zero_shot and not exports  # same weights, data and config: not measured again
    assert checkpoint.read_bytes() == written
    assert foundation_step(project.updated({"train.held_out_classes": []}), progress=False).source == "cached"
    assert len(exports) == 1
    assert foundation_step(project, force=True, progress=False).source == "pretrained"
    assert foundation_step(project.updated({"pretrain.seed": 1}), progress=False).source == "pretrained"
    assert checkpoint.read_bytes() != written
    assert len(pretrain_calls) == 2


def test_foundation_step_with_other_weights_resolves_them_instead(tiny_world, tmp_path, foundation):
    resolved = foundation_step(_project(tiny_world, tmp_path, **{"model.pretrained": str(foundation.out_path)}))
    assert resolved.source == "resolved" and resolved.weights == str(foundation.out_path)
    assert resolved.pretrain is None and resolved.zero_shot is not None
    assert not (tmp_path / "foundation" / "mumic-tiny.safetensors").exists()
    random_init = foundation_step(_project(tiny_world, tmp_path, **{"model.pretrained": None}))
    assert random_init.source == "random init" and random_init.zero_shot is None


def test_unreachable_real_weights_fail_in_the_foundation_step_with_the_fix(tiny_world, tmp_path):
    project = _project(tiny_world, tmp_path, **{"model.backbone": "ViT-B-32", "model.pretrained": "openai"})
    with pytest.raises(BackboneError, match="set model.pretrained to its local path"):
        foundation_step(project)


def test_missing_demo_foundation_names_the_command_that_builds_it(tiny_world, tmp_path):
    with pytest.raises(FileNotFoundError, match="mumic pretrain"):
        _project(tiny_world, tmp_path).foundation_weights()


def test_cli_pretrain_then_zero_shot(tiny_world, tmp_path, capsys):
    out = tmp_path / "foundation"
    sets = [f"--set={key}={value}" for key, value in FAST.items()]
    sets += [f"--set=model.pretrained={DEMO_FOUNDATION}", "--set=train.held_out_classes=[red triangle]"]
    common = ["--images-root", str(tiny_world.ingested), "--cache-dir", str(tiny_world.cache)]
    where = ["--splits", str(tiny_world.splits), "--taxonomy", str(tiny_world.taxonomy), "--out", str(out)]
    assert main(["pretrain", *sets, *where, *common]) == 0
    assert main(["pretrain", *sets, *where, *common]) == 0
    weights = out / "mumic-tiny.safetensors"
    assert weights.is_file() and (out / "mumic-tiny.safetensors.json").is_file() and (out / "foundation.json").is_file()
    model_dir = tmp_path / "zs"
    argv = ["zero-shot", "--weights", str(weights), "--taxonomy", str(tiny_world.taxonomy), "--model-dir"]
    assert main([*argv, str(model_dir)]) == 0
    split = ["--split", str(tiny_world.splits / "test.parquet"), "--out", str(tmp_path / "m.json")]
    assert main(["evaluate", "--model", str(model_dir), *split, *common]) == 0
    printed = capsys.readouterr().out
    assert "pretrain (pretrained):" in printed and "pretrain (cached):" in printed
    assert "zero-shot on the test split: GAP@10" in printed and "zero-shot:" in printed and "GAP@10" in printed
