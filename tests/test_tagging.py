"""Tagging unlabelled collections (`mumic tag`, the asset catalogue_tags): what it lists, that its scores are
`mumic predict`'s, that a killed run resumes without tagging an image twice or losing one, that a different run
refuses the parts folder, and that the catalogue follows the champion."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mumic_ml.backbone import create_backbone
from mumic_ml.cli import main
from mumic_ml.config import Head, Params, TagConfig
from mumic_ml.demo_world import generate_demo_world
from mumic_ml.image_batches import ImageEntry
from mumic_ml.model_io import build_classifier, save_model_dir
from mumic_ml.predict import Predictor
from mumic_ml.tagging import MAX_DECODING_WORKERS, TaggingError, decoding_workers, list_images, tag_images
from mumic_ml.taxonomy import class_prompts, load_taxonomy

REPO = Path(__file__).resolve().parents[1]
# Small parts and batches, so a few dozen images make several of each; no decoding processes unless a test is
# about them (each is a process spawned).
SMALL = TagConfig(batch_size=4, chunk_size=6, workers=0)


class World(NamedTuple):
    root: Path
    photos: Path
    model: Path
    taxonomy: Path


def save_model(out: Path, taxonomy_path: Path, *, seed: int, head: Head = Head.MUMIC) -> Path:
    """An untrained model directory with tuned-looking thresholds around the scores random weights give."""
    taxonomy = load_taxonomy(taxonomy_path)
    prompts = [class_prompts(name, taxonomy.default_prompts) for name in taxonomy.names]
    cfg = Params().model.model_copy(update={"head": head})
    torch.manual_seed(seed)
    backbone = create_backbone(cfg.backbone, None)
    thresholds = np.linspace(0.35, 0.65, len(prompts))
    thresholds[0] = np.inf  # a class with no validation positive: never tagged
    return save_model_dir(
        out,
        classifier=build_classifier(cfg, prompts, backbone).eval(),
        backbone_name=cfg.backbone,
        backbone_config=backbone.model_config,
        model_cfg=cfg,
        image_norm=backbone.image_norm,
        taxonomy=taxonomy,
        class_names=taxonomy.names,
        class_prompts=prompts,
        thresholds=thresholds,
        metadata={},
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A photo folder with sub-folders, three broken images, and files that are not photos."""
    root = tmp_path_factory.mktemp("tagging")
    demo = generate_demo_world(root / "demo", n_images=24, image_size=64, seed=0)
    photos = root / "photos"
    (photos / "2024" / "summer").mkdir(parents=True)
    for i, image in enumerate(sorted((demo.root / "images").glob("*.png"))):
        folder = photos if i < 8 else photos / "2024" if i < 16 else photos / "2024" / "summer"
        shutil.copy(image, folder / image.name)
    (photos / "broken.jpg").write_text("<html>404</html>")
    (photos / "empty.png").write_bytes(b"")
    (photos / "2024" / "cut.png").write_bytes(next((demo.root / "images").glob("*.png")).read_bytes()[:200])
    (photos / "notes.txt").write_text("not a photo")
    (photos / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (photos / "._img_000000.png").write_bytes(b"\0\5\26\7")
    model = save_model(root / "model", demo.taxonomy_path, seed=0)
    return World(root, photos, model, demo.taxonomy_path)


def tag(world, out: Path, config: TagConfig = SMALL, images=None, **kwargs):
    photos, model = world.photos, world.model
    return tag_images(
        kwargs.pop("model", model),
        list_images(photos) if images is None else images,
        out,
        source=str(photos),
        config=config,
        **kwargs,
    )


def test_a_folder_is_listed_recursively_in_name_order_without_hidden_or_other_files(world):
    photos = world.photos
    keys = [entry.key for entry in list_images(photos)]
    assert len(keys) == 27 and len(set(keys)) == 27
    assert keys[:3] == ["2024/cut.png", "2024/img_000008.png", "2024/img_000009.png"]
    assert "2024/summer/img_000016.png" in keys and "broken.jpg" in keys and "empty.png" in keys
    assert not [k for k in keys if k.endswith(".txt") or Path(k).name.startswith(".")]
    assert [entry.key for entry in list_images(photos)] == keys, "every run lists the same order"
    assert all(Path(entry.path).is_file() for entry in list_images(photos))


def test_a_manifest_lists_its_path_column_relative_to_its_folder_and_each_image_once(world, tmp_path):
    photos = world.photos
    manifest = photos / "manifest.csv"
    manifest.write_text('path,labels\nimg_000001.png,red\n2024/img_000009.png,"[not json"\nimg_000001.png,\n')
    try:
        entries = list(list_images(manifest))
        assert [e.key for e in entries] == ["img_000001.png", "2024/img_000009.png"]
        assert entries[0].path == str(photos / "img_000001.png")
        summary = tag(world, tmp_path / "tags.parquet", images=list_images(manifest))
    finally:
        manifest.unlink()
    # A label column that does not parse does not matter; a path listed twice is listed, and tagged, once.
    frame = pd.read_parquet(tmp_path / "tags.parquet")
    assert list(frame["path"]) == ["img_000001.png", "2024/img_000009.png"]
    assert summary.images == 2 and summary.errors == 0
    with pytest.raises(TaggingError, match="no such folder or manifest"):
        list_images(photos / "missing")


@pytest.fixture(scope="module")
def tagged(world):
    """The folder tagged with one decoding worker (the path a real collection takes), embeddings included."""
    root = world.root
    config = TagConfig(batch_size=4, chunk_size=6, workers=1)
    summary = tag(world, root / "tags.parquet", config, embeddings=True, extra_classes=["purple hexagon"])
    return summary, pd.read_parquet(root / "tags.parquet")


def test_scores_tags_and_errors_are_predicts(world, tagged):
    photos, model = world.photos, world.model
    summary, frame = tagged
    predictor = Predictor.from_dir(model)
    paths = [str(photos / key) for key in frame["path"]]
    names, probs, errors = predictor.probabilities(paths, extra_classes=["purple hexagon"])
    thresholds = np.append(predictor.model.calibrated_thresholds, 0.5)  # the extra class has no tuned threshold
    assert list(frame["error"].fillna("-")) == [e or "-" for e in errors]
    for row, p, error in zip(frame.itertuples(), probs, errors, strict=True):
        if error is not None:
            assert row.top_labels is None and row.tags is None and np.isnan(row.embedding).all()
            continue
        order = np.argsort(-p, kind="stable")
        assert list(row.top_labels) == [names[j] for j in order[:5]]
        np.testing.assert_allclose(row.top_scores, p[order[:5]], rtol=1e-6)
        kept = [j for j in order if p[j] >= thresholds[j]]
        assert list(row.tags) == [names[j] for j in kept]
        np.testing.assert_allclose(row.tag_scores, p[kept], rtol=1e-6)
    assert names[0] not in {tag for tags in frame["tags"].dropna() for tag in tags}, "an infinite threshold never tags"
    n_tags = frame["tags"].dropna().map(len)
    assert n_tags.sum() > 0 and (n_tags < len(names)).all(), "the thresholds must cut somewhere for this to test"
    assert summary.images == 27 and summary.tagged == 24 and summary.errors == 3 and summary.resumed == 0


def test_unreadable_images_are_error_rows_with_a_reason(tagged):
    _, frame = tagged
    errors = frame.set_index("path")["error"].dropna()
    assert errors["broken.jpg"].startswith("not_an_image:")
    assert errors["empty.png"].startswith("empty_file:")
    assert errors["2024/cut.png"].split(":")[0] in {"truncated", "decode_error"}
    assert len(errors) == 3


def test_embeddings_are_fixed_size_float32_and_equal_embed(world, tagged):
    photos, model = world.photos, world.model
    _, frame = tagged
    field = pq.read_schema(world.root / "tags.parquet").field("embedding")
    dim = Predictor.from_dir(model).embedding_dim
    assert pa.types.is_fixed_size_list(field.type) and field.type.list_size == dim
    assert field.type.value_type == pa.float32()
    readable = frame[frame["error"].isna()]
    matrix = np.stack(readable["embedding"].to_list())
    assert matrix.shape == (24, dim) and matrix.dtype == np.float32
    expected, _ = Predictor.from_dir(model).embed([str(photos / key) for key in readable["path"]])
    np.testing.assert_allclose(matrix, expected, atol=1e-6)


def test_an_extra_class_is_ranked_among_the_models_and_needs_a_text_tower(world, tmp_path):
    """Its scores equal `mumic predict`'s (test_scores_tags_and_errors_are_predicts tags with it)."""
    everything = tag(world, tmp_path / "all.parquet", TagConfig(top_k=100, workers=0), extra_classes=["purple hexagon"])
    ranked = pd.read_parquet(everything.out)["top_labels"].dropna()
    n_classes = len(load_taxonomy(world.taxonomy).names)
    assert all("purple hexagon" in labels and len(labels) == n_classes + 1 for labels in ranked)
    linear = save_model(tmp_path / "linear", world.taxonomy, seed=0, head=Head.LINEAR)
    with pytest.raises(TaggingError, match="linear head"):
        tag(world, tmp_path / "linear.parquet", model=linear, extra_classes=["purple hexagon"])


def test_no_embedding_column_unless_asked(world, tmp_path):
    tag(world, tmp_path / "tags.parquet", images=list_images(world.photos / "2024" / "summer"))
    assert "embedding" not in pq.read_schema(tmp_path / "tags.parquet").names
    assert not (tmp_path / "tags.parquet.parts").exists(), "the parts are removed once combined"


class Killed(Exception):
    pass


def interrupted(world, out: Path, after: int, **kwargs) -> list[str]:
    """A run that dies after listing `after` images; the image keys its committed parts hold."""

    def entries():
        for i, entry in enumerate(list_images(world.photos)):
            if i == after:
                raise Killed
            yield entry

    with pytest.raises(Killed):
        tag(world, out, images=entries(), **kwargs)
    parts = sorted(out.with_name(out.name + ".parts").glob("part-*.parquet"))
    return [key for part in parts for key in pq.read_table(part)["path"].to_pylist()]


def test_a_run_with_another_model_classes_or_settings_refuses_the_parts(world, tmp_path):
    taxonomy = world.taxonomy
    out = tmp_path / "tags.parquet"
    committed = interrupted(world, out, after=15)
    assert len(committed) == 12  # two parts of six
    other_model = save_model(tmp_path / "other", taxonomy, seed=1)
    refusals = [
        ({"model": other_model}, "differs in model"),
        ({"extra_classes": ["purple hexagon"]}, "classes (added ['purple hexagon'], removed [])"),
        ({"config": SMALL.model_copy(update={"threshold": 0.9})}, "threshold (None there, 0.9 now)"),
    ]
    for change, message in refusals:
        with pytest.raises(TaggingError, match="delete the folder to start afresh") as refused:
            tag(world, out, **change)
        assert message in str(refused.value)
        assert not out.exists()
    # The same run takes up where the parts end.
    summary = tag(world, out)
    assert summary.resumed == 12 and summary.images == 27
    assert pd.read_parquet(out).equals(pd.read_parquet(tag(world, tmp_path / "whole.parquet").out))


def test_a_superseded_run_is_discarded_when_asked(world, tmp_path):
    out = tmp_path / "tags.parquet"
    interrupted(world, out, after=15)
    summary = tag(world, out, config=SMALL.model_copy(update={"top_k": 2}), replace_other_run=True)
    assert summary.resumed == 0 and summary.images == 27
    assert pd.read_parquet(out)["top_labels"].dropna().map(len).eq(2).all()


def test_decoding_workers_hand_over_the_batches_they_began_before_the_listing_failed(world, tmp_path):
    committed = interrupted(world, tmp_path / "tags.parquet", after=15, config=SMALL.model_copy(update={"workers": 1}))
    assert len(committed) == 12


def test_lanes_score_as_one_thread_does_and_torch_gets_its_threads_back(world, tmp_path):
    """Each lane runs its batch on one thread, so four lanes and one give the same bits."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pd.read_parquet(tag(world, tmp_path / "one.parquet", embeddings=True).out)
        torch.set_num_threads(4)
        lanes = pd.read_parquet(tag(world, tmp_path / "lanes.parquet", embeddings=True).out)
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)
    assert lanes.equals(one)


def test_decoding_processes_default_to_none_on_a_cpu_and_the_spare_cores_on_a_gpu(monkeypatch):
    """On a CPU the lanes decode (faster than a process competing for their cores); a GPU's one lane must not."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert decoding_workers(None, cpu) == 0
    assert decoding_workers(3, cpu) == 3 and decoding_workers(0, gpu) == 0
    for cores, expected in [(1, 1), (2, 1), (3, 2), (16, MAX_DECODING_WORKERS)]:
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert decoding_workers(None, gpu) == expected
    assert TagConfig().workers is None and Params().tag.workers is None


def test_a_batch_of_unreadable_images_is_error_rows_only(world, tmp_path):
    photos = world.photos
    images = [ImageEntry(key, str(photos / key)) for key in ("broken.jpg", "empty.png", "2024/cut.png")]
    summary = tag(world, tmp_path / "tags.parquet", images=images, embeddings=True)
    frame = pd.read_parquet(summary.out)
    assert summary.errors == 3 and list(frame["path"]) == ["broken.jpg", "empty.png", "2024/cut.png"]
    assert frame[["top_labels", "top_scores", "tags", "tag_scores"]].isna().all().all()
    assert np.isnan(np.stack(frame["embedding"].to_list())).all()


def project_folder(root: Path, overrides: dict[str, dict]) -> Path:
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.mark.slow  # a second interpreter importing torch: the in-process interruptions above cover resuming fast
def test_a_killed_cli_run_resumes_to_the_uninterrupted_result(world, tmp_path, capsys, monkeypatch):
    """`mumic tag` as written, killed with SIGKILL after two committed parts, then run again."""
    photos, model = world.photos, world.model
    # Single-image batches in parts of two: the run is still going when its second part lands.
    config = TagConfig(batch_size=1, chunk_size=2, workers=0)
    project = project_folder(tmp_path / "project", {"tag": config.model_dump()})
    out = tmp_path / "tags.parquet"
    argv = ["tag", "--model", str(model), "--images", str(photos), "--out", str(out), "--no-progress"]
    parts = tmp_path / "tags.parquet.parts"
    proc = subprocess.Popen([sys.executable, "-m", "mumic_ml", *argv], cwd=project, stdout=subprocess.DEVNULL)
    try:
        while proc.poll() is None and len(list(parts.glob("part-*.parquet"))) < 2:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    committed = [k for p in sorted(parts.glob("part-*.parquet")) for k in pq.read_table(p)["path"].to_pylist()]
    assert not out.exists() and len(committed) >= 4

    monkeypatch.chdir(project)
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    resumed = pd.read_parquet(out)
    keys = [entry.key for entry in list_images(photos)]
    assert sorted(resumed["path"]) == sorted(keys) and resumed["path"].is_unique
    assert summary["images"] == len(keys) == 27 and summary["errors"] == 3 and summary["tagged"] == 24
    assert summary["resumed"] >= len(committed)
    assert set(summary) >= {"images", "tagged", "errors", "seconds", "images_per_s"}
    assert not parts.exists()
    whole = tag_images(model, list_images(photos), tmp_path / "whole.parquet", source=str(photos), config=config)
    assert resumed.equals(pd.read_parquet(whole.out))


def test_the_cli_refuses_another_runs_parts_and_a_missing_input(world, tmp_path, capsys, monkeypatch):
    photos, model = world.photos, world.model
    monkeypatch.chdir(project_folder(tmp_path / "project", {"tag": {"workers": 0}}))
    out = tmp_path / "tags.parquet"
    interrupted(world, out, after=15)
    capsys.readouterr()
    base = ["tag", "--model", str(model), "--images", str(photos), "--out", str(out), "--no-progress"]
    assert main([*base, "--top-k", "3"]) == 2
    assert "differs in top_k (5 there, 3 now)" in capsys.readouterr().err
    assert main([*base[:4], str(photos / "missing"), *base[5:]]) == 2
    assert "no such folder or manifest" in capsys.readouterr().err
    assert main([*base[:2], str(tmp_path / "no-model"), *base[3:]]) == 2
    assert "model directory not found" in capsys.readouterr().err


# --- the Dagster asset and its sensor -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(world, tracking_store, tmp_path_factory):
    """A project whose registry has the test model as version 1, champion; downloads go to a throwaway cache."""
    pytest.importorskip("mlflow")
    from mumic_ml.pipeline.registry import log_model, promote, register_model
    from mumic_ml.pipeline.tracking import start_run

    root = project_folder(tmp_path_factory.mktemp("catalogue"), {"tag": {"workers": 0, "chunk_size": 8}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / ".cache"))
        with start_run(experiment="mumic", tracking_uri=tracking_store, run_name="catalogue") as run_id:
            pass
        model_uri = log_model(run_id, world.model, tracking_uri=tracking_store)
        register_model(run_id, model_uri, name="mumic", tags={}, gate_passed=True, tracking_uri=tracking_store)
        promote("mumic", version=1, reason="first", tracking_uri=tracking_store)
        yield root, run_id, model_uri


def materialize_catalogue(root: Path):
    import dagster as dg

    from mumic_dagster import catalogue
    from mumic_dagster.resources import ComputeResource, MlflowResource, ProjectResource

    resources = {
        "project": ProjectResource(root=str(root)),
        "mlflow": MlflowResource(),
        "compute": ComputeResource(device="cpu"),
    }
    result = dg.materialize([catalogue.catalogue_tags], resources=resources, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    [event] = result.get_asset_materialization_events()
    return event.materialization.metadata


def test_the_catalogue_asset_tags_the_unlabelled_folder_with_the_champion(world, registry):
    root, _, _ = registry
    metadata = materialize_catalogue(root)
    assert metadata["images"].value == 0 and "does not exist" in metadata["note"].value

    shutil.copytree(world.photos, root / "data" / "unlabelled")
    metadata = materialize_catalogue(root)
    assert (metadata["images"].value, metadata["tagged"].value, metadata["errors"].value) == (27, 24, 3)
    assert metadata["champion_version"].value == 1 and metadata["images_per_s"].value > 0
    assert metadata["label_histogram"].value.startswith("![images per tag](data:image/png;base64,")
    frame = pd.read_parquet(root / "reports" / "tags.parquet")
    top = [record.data for record in metadata["top_labels"].value.records]
    counts = frame["tags"].dropna().explode().value_counts()
    assert top[0]["label"] == counts.index[0] and top[0]["tagged_images"] == counts.iloc[0]
    assert "note" not in metadata

    for photo in (root / "data" / "unlabelled").rglob("*.*"):
        photo.unlink()
    metadata = materialize_catalogue(root)
    assert metadata["images"].value == 0 and "is empty" in metadata["note"].value
    assert pd.read_parquet(root / "reports" / "tags.parquet").empty


def test_the_champion_sensor_runs_the_catalogue_each_time_the_champion_moves(registry, tracking_store):
    import dagster as dg
    from mlflow.tracking import MlflowClient

    from mumic_dagster.catalogue import champion_sensor
    from mumic_dagster.definitions import defs
    from mumic_dagster.resources import MlflowResource, ProjectResource
    from mumic_ml.pipeline.registry import promote, rollback

    root, run_id, model_uri = registry
    assert defs.resolve_sensor_def("champion_sensor").job_name == "catalogue_job"
    retrain = defs.resolve_job_def("retrain_job").asset_layer.selected_asset_keys
    assert dg.AssetKey("catalogue_tags") not in retrain, "a retrain does not move the champion"

    def tick(cursor):
        context = dg.build_sensor_context(
            cursor=cursor, resources={"project": ProjectResource(root=str(root)), "mlflow": MlflowResource()}
        )
        return champion_sensor(context)

    first = tick(None)
    assert [r.tags["mumic/champion_version"] for r in first.run_requests] == ["1"]
    assert not tick(first.cursor).run_requests, "the same champion does not run twice"
    # A new version (a registered challenger) is not a move of the champion; its promotion is, and so is a rollback.
    client = MlflowClient(tracking_store)
    client.create_model_version("mumic", source=model_uri, run_id=run_id)
    assert not tick(first.cursor).run_requests
    promote("mumic", version=2, reason="second", tracking_uri=tracking_store)
    second = tick(first.cursor)
    assert [r.tags["mumic/champion_version"] for r in second.run_requests] == ["2"]
    rollback("mumic", tracking_uri=tracking_store)
    third = tick(second.cursor)
    assert [r.tags["mumic/champion_version"] for r in third.run_requests] == ["1"]
    assert len({r.run_key for r in (*first.run_requests, *second.run_requests, *third.run_requests)}) == 3


def test_the_cli_resolves_the_champion_like_predict(world, registry, tmp_path, capsys, monkeypatch):
    root, _, _ = registry
    monkeypatch.chdir(root)
    out = tmp_path / "tags.parquet"
    photos = world.photos / "2024" / "summer"
    capsys.readouterr()
    assert main(["tag", "--model", "models:/mumic@champion", "--images", str(photos), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["tagged"] == 8
