"""MuMIC as an MLflow pyfunc model, and the registry life cycle: register -> challenger -> champion -> rollback.

The logged model
    A model directory (`model.json`, `model.safetensors`, `architecture/`, `taxonomy.yaml`) travels unchanged as the
    pyfunc artifact `model_dir`; weights stay safetensors. The pyfunc itself is logged as *code* (MLflow "models from
    code": a three-line script that calls `mlflow.models.set_model(MumicPyfunc())`), so the logged model holds no
    pickle at all, not even of the wrapper class. The script imports `mumic_ml.pipeline.registry`, so `mumic` has
    to be installed where the model is loaded (`--env-manager local`, or an image built from this repository). We
    do not ship a copy of the package via `code_paths`: MLflow only prepends that copy to `sys.path`, so which code
    runs would depend on whether `mumic_ml` was imported first, and torch/open_clip must be installed regardless.
    `requirements.txt` pins the runtime dependencies of the `mumic` distribution and mlflow as logged.

Input: a DataFrame with an `image` column; each cell is
    - a path (`str`) to an image file readable by the process that runs the model (see "Paths" below),
    - raw encoded image bytes (`bytes`), from Python,
    - `{"b64": "<base64 of the encoded image>"}`, the JSON form of raw bytes (the TensorFlow Serving convention)
      for REST clients, since JSON has no bytes type.
    The column is declared `AnyType` (`mlflow.types.schema.AnyType`): a `binary` column would base64-decode strings
    sent over REST (paths included) and a `string` column would refuse bytes; the model validates each cell itself
    and reports a bad one in that row's `error` instead of failing the batch.
Params (all optional): `top_k` (long, default 5), `threshold` (double, default none), `extra_classes` (list of
    strings, default []: class names scored zero-shot next to the trained ones).
Output: a DataFrame with `labels` (best first), `scores` (calibrated probabilities: the sigmoid after the
    temperature and bias fitted on validation, `mumic_ml.calibration`; same order) and `error` (None, or why the
    image could not be read).

Paths: safe by default when served, the caller's own files when in-process.
    Served by MLflow's scoring server (`mlflow models serve`, `make serve`, an image from `mlflow models
    build-docker`), the model opens no path unless `MUMIC_IMAGE_ROOT` names a folder on the server: without it every
    path cell gets `path_input_disabled`; with it, a path is taken relative to that folder, resolved (symlinks, `..`)
    and read only if it still lies inside, else `path_outside_image_root`, which says nothing about the file, not
    even whether it exists. No error message ever quotes a file's bytes. Served means MLflow's server environment
    (`__pyfunc_model_path__` or `_MLFLOW_IS_IN_SERVING_ENVIRONMENT`), checked per request because the server sets
    the latter only after loading the model. In-process (`mlflow.pyfunc.load_model(...).predict(df)`) any path
    the caller names is read, or only those under `MUMIC_IMAGE_ROOT` when it is set. Bytes and `{"b64": ...}`
    cells are always accepted.

Serving (checked with mlflow 3.17.2; `make serve` runs the first command with `.venv/bin` on PATH, as MLflow
starts `uvicorn` by name):
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db MUMIC_IMAGE_ROOT=/srv/photos mlflow models serve \
        -m models:/mumic@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{
        "dataframe_split": {"columns": ["image"], "data": [["cats/a.png"], [{"b64": "iVBORw0KG..."}]]},
        "params": {"top_k": 3, "extra_classes": ["purple hexagon"]}}'
    -> {"predictions": [{"labels": [...], "scores": [...], "error": null}, ...]}
    (`dataframe_records` works too: [{"image": "/srv/photos/cats/a.png"}].)

Registry
    `register_model` refuses a model that failed the evaluation gate, is idempotent per run, tags the version and
    points `challenger` at it; `describe_version` sets its description to the `model_card` (Markdown). `promote`
    moves `champion` (the decision is the gate's comparison, made by the promote step) and keeps the old champion
    as `previous_champion`; `rollback` swaps the two back.
    `resolve_model_uri` turns `models:/mumic@champion` into a local model directory.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata
import io
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from mumic_ml.io import atomic_directory
from mumic_ml.pipeline.tracking import tracking_scope

MODEL_NAME = "mumic"
CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
MODEL_DIR_ARTIFACT = "model_dir"

TAG_GATE = "gate"
TAG_TEST_SPLIT = "test_split"
GATE_PASSED = "passed"
GATE_FAILED = "failed"
SPLIT_HASH_KEY = "split_sha256"  # where `evaluate_model` reports name the exact bytes of the split they scored

_MODEL_CODE = """\
# MuMIC pyfunc, logged as code (no pickle): the weights are the safetensors in the `model_dir` artifact.
import mlflow

from mumic_ml.pipeline.registry import MumicPyfunc

mlflow.models.set_model(MumicPyfunc())
"""


class RegistryError(RuntimeError):
    """A registry operation was refused or its target does not exist."""


class GateFailedError(RegistryError):
    """The model did not pass the evaluation gate and must not be registered."""


# --- the pyfunc model -------------------------------------------------------------------------------------------


# The folder a model may read `image` paths from (symlinks and `..` resolved). Unset, a served model reads no
# path at all, so a client cannot make the server open its files; in-process use reads any path the caller names.
IMAGE_ROOT_ENV = "MUMIC_IMAGE_ROOT"

# What MLflow's scoring server (`mlflow models serve`, the Docker image, spark_udf's server) puts in its environment:
# the model path before loading, the serving flag after loading (and while `log_model` checks the input example).
_SERVER_MODEL_PATH_ENV = "__pyfunc_model_path__"
_SERVING_FLAG_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"


@dataclass(frozen=True)
class PathPolicy:
    """Which `image` cells given as paths the model may open; read per request, as serving is only known then."""

    image_root: str | None  # already resolved (os.path.realpath); None: no root configured
    served: bool

    @classmethod
    def from_environment(cls) -> PathPolicy:
        root = os.environ.get(IMAGE_ROOT_ENV) or None
        served = _SERVER_MODEL_PATH_ENV in os.environ or os.environ.get(_SERVING_FLAG_ENV, "").lower() in ("true", "1")
        return cls(None if root is None else os.path.realpath(root), served)

    def resolve(self, value: str | os.PathLike) -> str:
        """The path to open, or ValueError; a refusal says nothing about the file, not even whether it exists."""
        path = os.fsdecode(value)
        if self.image_root is None and self.served:
            raise ValueError(
                "path_input_disabled: this server reads no image paths; send the image as {'b64': ...} "
                f"(or start the server with {IMAGE_ROOT_ENV} set to the folder it may read)"
            )
        if "\x00" in path:
            raise ValueError("invalid_path: the path contains a NUL byte")
        if self.image_root is None:
            return path
        real = os.path.realpath(os.path.join(self.image_root, path))  # relative paths are taken from the root
        if os.path.commonpath([self.image_root, real]) != self.image_root:
            raise ValueError(f"path_outside_image_root: image paths are read only under {IMAGE_ROOT_ENV}")
        return real


def _image_source(value: Any, paths: PathPolicy) -> str | bytes:
    """One `image` cell as a path or encoded bytes; ValueError names what was wrong with it."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str | os.PathLike):
        return paths.resolve(value)
    if isinstance(value, Mapping) and isinstance(value.get("b64"), str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError as exc:
            raise ValueError(f"invalid_base64: {exc}") from None
    raise ValueError(f"unsupported_input: expected a path, bytes or {{'b64': ...}}, got {type(value).__name__}")


class MumicPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the model directory in `load_context`; holds nothing before that, so it is trivially re-creatable."""

    def load_context(self, context) -> None:
        from mumic_ml.predict import Predictor

        device = (context.model_config or {}).get("device", "auto")
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor.from_dir(context.artifacts[MODEL_DIR_ARTIFACT], device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise MlflowException("input must be a DataFrame with an 'image' column", INVALID_PARAMETER_VALUE)
        errors: list[str | None] = [None] * len(model_input)
        sources: dict[int, str | bytes] = {}
        paths = PathPolicy.from_environment()
        for i, value in enumerate(model_input["image"].tolist()):
            try:
                sources[i] = _image_source(value, paths)
            except ValueError as exc:
                errors[i] = str(exc)
        threshold = params.get("threshold")
        top_k = int(params.get("top_k", 5))
        if top_k < 1:
            raise MlflowException(f"top_k must be at least 1, got {top_k}", INVALID_PARAMETER_VALUE)
        predictions = self.predictor.predict(
            list(sources.values()),
            top_k=top_k,
            threshold=None if threshold is None else float(threshold),
            extra_classes=list(params.get("extra_classes") or []),
        )
        labels: list[list[str]] = [[] for _ in errors]
        scores: list[list[float]] = [[] for _ in errors]
        for i, prediction in zip(sources, predictions):
            labels[i], scores[i], errors[i] = prediction.labels, prediction.scores, prediction.error
        # object dtype keeps None as None (pandas 3 would infer a string column and turn None into NaN)
        return pd.DataFrame({"labels": labels, "scores": scores, "error": pd.Series(errors, dtype=object)})


def model_signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image")]),
        outputs=Schema(
            [
                ColSpec(Array(DataType.string), "labels"),
                ColSpec(Array(DataType.double), "scores"),
                ColSpec(DataType.string, "error", required=False),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("top_k", DataType.long, 5),
                ParamSpec("threshold", DataType.double, None),
                ParamSpec("extra_classes", DataType.string, [], shape=(-1,)),
            ]
        ),
    )


def _example_image() -> str:
    """A tiny grey PNG, base64: an input example that is valid on any machine (a path would not be)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pip_requirements() -> list[str]:
    """The `mumic` distribution's runtime dependencies pinned as installed, plus mlflow (no slow inference)."""
    pins = {"mlflow": mlflow.__version__}
    try:
        requirements = importlib.metadata.requires("mumic") or []
    except importlib.metadata.PackageNotFoundError:  # a source checkout that was never installed
        requirements = []
    for requirement in requirements:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            pins[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def log_model(
    run_id: str, model_dir: str | os.PathLike, *, name: str = "model", tracking_uri: str | None = None
) -> str:
    """Log `model_dir` as a pyfunc model of run `run_id`; returns its URI (`models:/m-...`).

    MLflow validates the input example by loading the logged model and predicting on it, so a model that cannot
    serve fails here, not in production. The run is reopened to log into it and closed again (FINISHED).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "model.json").is_file():
        raise RegistryError(f"{model_dir} is not a MuMIC model directory")
    with tracking_scope(tracking_uri), tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "mumic_pyfunc.py"
        code.write_text(_MODEL_CODE, encoding="utf-8")
        example = pd.DataFrame({"image": [{"b64": _example_image()}]})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code),
                artifacts={MODEL_DIR_ARTIFACT: str(model_dir)},
                signature=model_signature(),
                input_example=(example, {"top_k": 5}),
                pip_requirements=_pip_requirements(),
                model_config={"device": "auto"},
            )
    return info.model_uri


# --- the registry -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    run_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    created: bool = False  # True only on the version `register_model` has just created
    description: str = ""  # the model card (Markdown)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @classmethod
    def from_mlflow(cls, mv) -> ModelVersionInfo:
        aliases, tags = tuple(mv.aliases or ()), dict(mv.tags or {})
        return cls(mv.name, int(mv.version), mv.run_id, mv.source, aliases, tags, description=mv.description or "")


@dataclass(frozen=True)
class PromotionResult:
    """What a promote or rollback did: `moved` is False when it refused or there was nothing to do."""

    name: str
    moved: bool
    champion: int | None
    previous_champion: int | None
    reason: str
    forced: bool = False


def _get_version(client: MlflowClient, name: str, version: int | str) -> ModelVersionInfo:
    try:
        return ModelVersionInfo.from_mlflow(client.get_model_version(name, str(version)))
    except MlflowException as exc:
        if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise RegistryError(f"model {name!r} has no version {version}") from None
        raise


def _by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersionInfo | None:
    try:
        return ModelVersionInfo.from_mlflow(client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)):
            return None
        raise


def register_model(
    run_id: str,
    model_uri: str,
    *,
    name: str = MODEL_NAME,
    tags: Mapping[str, Any],
    gate_passed: bool,
    metrics: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> ModelVersionInfo:
    """Register the model logged by `run_id` as a new version of `name`, tag it and make it the `challenger`.

    `metrics` (an `evaluate_model` report of the test split) supplies the tags promotion relies on: `gap_at_10`,
    and `test_split` (the split file's sha256) so that promotion can tell whether two versions were measured on the
    same split. `tags` (e.g. `data_version`) are stored as given and win over those. Registering the same run again
    returns its existing version (tags and alias refreshed) instead of adding a duplicate.
    """
    if not gate_passed:
        raise GateFailedError(f"refusing to register run {run_id}: the model did not pass the evaluation gate")
    measured = {}
    if metrics is not None:
        measured = {key: metrics[key] for key in ("gap_at_10", "gap", "map_macro") if metrics.get(key) is not None}
        if metrics.get(SPLIT_HASH_KEY):
            measured[TAG_TEST_SPLIT] = metrics[SPLIT_HASH_KEY]
    string_tags = {k: str(v) for k, v in {**measured, **tags, TAG_GATE: GATE_PASSED}.items()}
    client = MlflowClient(tracking_uri)
    existing = _version_of_run(client, name, run_id)
    if existing is None:
        with tracking_scope(tracking_uri):
            version = int(mlflow.register_model(model_uri, name, tags=string_tags).version)
    else:
        version = existing.version
        for key, value in string_tags.items():
            client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    return dataclasses.replace(_get_version(client, name, version), created=existing is None)


def model_card(
    *,
    name: str,
    version: int,
    data_version: Mapping[str, str],
    metrics: Mapping[str, Any],
    gate: Mapping[str, Any],
    class_names: list[str],
    held_out_classes: list[str],
    backbone: str,
    run_id: str,
    dagster_run_id: str | None = None,
) -> str:
    """The model version's description in Markdown: what it was trained on, how it scored, why the gate let it
    through, what it predicts and how to call it; what someone who finds it in the registry needs first."""
    lines = [
        f"## {name} version {version}",
        "",
        f"MuMIC multi-label image classifier fine-tuned from `{backbone}`; MLflow run `{run_id}`"
        + (f", Dagster run `{dagster_run_id}`." if dagster_run_id else "."),
        "",
        "**Data version**",
        "",
        *(f"- `{key}`: {value}" for key, value in data_version.items()),
        "",
        "**Test split**: "
        + ", ".join(
            f"{label} {metrics[key]:.4f}"
            for key, label in (("gap_at_10", "GAP@10"), ("gap", "GAP"), ("map_macro", "mAP"))
            if metrics.get(key) is not None
        )
        + (f" on {metrics['num_images']} images" if metrics.get("num_images") else ""),
    ]
    zero_shot = metrics.get("zero_shot") or {}
    if zero_shot.get("map_held_out") is not None:
        lines += ["", f"**Zero-shot on held-out classes** (never trained on): mAP {zero_shot['map_held_out']:.4f}"]
    verdict = "passed" if gate.get("passed") else "failed"
    lines += ["", f"**Evaluation gate**: {verdict} (GAP@10 floor {gate.get('floor')})"]
    lines += [f"- {reason}" for reason in gate.get("reasons", [])]
    lines += [f"- note: {note}" for note in gate.get("notes", [])]
    lines += ["", f"**Classes** ({len(class_names)}): " + ", ".join(class_names)]
    if held_out_classes:
        lines += ["", "**Held out** (scored zero-shot from their names): " + ", ".join(held_out_classes)]
    lines += [
        "",
        "**Use**: once promoted, through the `champion` alias (`challenger` until then):",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{name}@{CHAMPION}")',
        'model.predict(pd.DataFrame({"image": ["photo.jpg"]}), params={"top_k": 5})',
        "```",
        "",
        "Served over REST with `make serve` (port 5001): POST `/invocations` with "
        '`{"dataframe_split": {"columns": ["image"], "data": [[{"b64": "<base64 image>"}]]}}`.',
    ]
    return "\n".join(lines)


def describe_version(name: str, version: int, description: str, *, tracking_uri: str | None = None) -> None:
    """The version's description as the registry UI shows it on the version page (Markdown)."""
    MlflowClient(tracking_uri).update_model_version(name, str(version), description=description)


def _version_of_run(client: MlflowClient, name: str, run_id: str) -> ModelVersionInfo | None:
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not versions:
        return None
    return ModelVersionInfo.from_mlflow(min(versions, key=lambda mv: int(mv.version)))


def registered_version_of_run(name: str, run_id: str, *, tracking_uri: str | None = None) -> ModelVersionInfo | None:
    """The version already registered from `run_id`, so re-running registration logs nothing twice."""
    return _version_of_run(MlflowClient(tracking_uri), name, run_id)


def current_champion(name: str = MODEL_NAME, *, tracking_uri: str | None = None) -> ModelVersionInfo | None:
    return _by_alias(MlflowClient(tracking_uri), name, CHAMPION)


def promotion_candidate(
    name: str = MODEL_NAME, version: int | None = None, *, tracking_uri: str | None = None
) -> ModelVersionInfo:
    """The version a promotion is about: `version`, else the one the `challenger` alias points at."""
    client = MlflowClient(tracking_uri)
    if version is not None:
        return _get_version(client, name, version)
    candidate = _by_alias(client, name, CHALLENGER)
    if candidate is None:
        raise RegistryError(f"model {name!r} has no {CHALLENGER!r} to promote; register a model first")
    return candidate


def promote(
    name: str = MODEL_NAME, *, version: int, reason: str, forced: bool = False, tracking_uri: str | None = None
) -> PromotionResult:
    """Point `champion` at `version` and keep the champion it replaces as `previous_champion`.

    Whether the version deserves it is decided before, by the same comparison as the evaluation gate
    (`mumic_ml.gate.compare_with_champion`, applied by `mumic_ml.steps.promote_step`); `reason` records why.
    """
    client = MlflowClient(tracking_uri)
    candidate = _get_version(client, name, version)
    champion = _by_alias(client, name, CHAMPION)
    champion_version = None if champion is None else champion.version
    if champion_version == candidate.version:
        already = f"version {candidate.version} is already the champion"
        return PromotionResult(name, False, champion_version, None, already)
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(champion.version))
    client.set_registered_model_alias(name, CHAMPION, str(candidate.version))
    return PromotionResult(name, True, candidate.version, champion_version, reason, forced=forced)


def rollback(name: str = MODEL_NAME, *, tracking_uri: str | None = None) -> PromotionResult:
    """Put `champion` back on `previous_champion`; the two swap, so a second rollback undoes the first."""
    client = MlflowClient(tracking_uri)
    previous = _by_alias(client, name, PREVIOUS_CHAMPION)
    if previous is None:
        raise RegistryError(f"model {name!r} has no {PREVIOUS_CHAMPION!r} to roll back to")
    champion = _by_alias(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, str(previous.version))
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(champion.version))
    return PromotionResult(
        name,
        True,
        previous.version,
        None if champion is None else champion.version,
        f"rolled back to version {previous.version}",
    )


# --- resolving a registry URI to a local model directory -----------------------------------------------------------


def default_model_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mumic" / "models"


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def _cache_key(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(concrete URI, cache folder name): aliases are resolved first, because they move and versions do not."""
    match = _MODELS_URI.match(uri)
    if match is None:  # models:/m-<id>, runs:/...: immutable already
        return uri, "uri-" + hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = match["name"]
    if match["alias"]:
        mv = _by_alias(client, name, match["alias"])
        if mv is None:
            raise RegistryError(f"model {name!r} has no alias {match['alias']!r}")
    else:
        mv = _get_version(client, name, match["version"])
    # The source names the logged model uniquely; it keeps a cache valid across a reset registry reusing numbers.
    digest = hashlib.sha256(mv.source.encode()).hexdigest()[:16]
    return mv.uri, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-v{mv.version}-{digest}"


def resolve_model_uri(uri: str, *, cache_dir: str | os.PathLike | None = None, tracking_uri: str | None = None) -> Path:
    """A local MuMIC model directory for `uri`: a local directory as is, an MLflow model URI downloaded once.

    `models:/mumic@champion` is resolved to its version at call time; the download is cached per version under
    `cache_dir` (default `~/.cache/mumic/models`) and swapped in whole, so an interrupted download never serves.
    """
    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if not path.is_dir():
            raise RegistryError(f"model directory not found: {path}")
        return path
    client = MlflowClient(tracking_uri)
    concrete, key = _cache_key(client, uri)
    target = Path(cache_dir or default_model_cache()) / key
    if not (target / "MLmodel").is_file():
        with atomic_directory(target) as staging, tracking_scope(tracking_uri):
            mlflow.artifacts.download_artifacts(artifact_uri=concrete, dst_path=str(staging))
    artifacts = Model.load(str(target)).flavors.get("python_function", {}).get("artifacts", {})
    if MODEL_DIR_ARTIFACT not in artifacts:
        raise RegistryError(f"{uri} is not a MuMIC pyfunc model (no {MODEL_DIR_ARTIFACT!r} artifact)")
    return target / artifacts[MODEL_DIR_ARTIFACT]["path"]
