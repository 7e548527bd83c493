"""A MuMIC project: a folder laid out like the repository, the parameters it runs with, and what its files say.

Every file and folder the pipeline reads or writes is a typed property of `Project`, taken from the absolute
project root, so no step depends on the current directory, and a misspelt path is an AttributeError where it is
written rather than a failure deep inside a step. The data version is the md5 of each split file, the hash DVC
records for it, so what a run is tagged with can be compared with `dvc.lock` directly, and one combined identifier
of the three (`data_version_fields`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mumic_ml.config import DEFAULT_PARAMS_FILE, DEMO_FOUNDATION, Params, load_params
from mumic_ml.io import file_digest

SPLITS = ("train", "val", "test")
# What DVC records for a file output.
DVC_DIGEST = "md5"


@dataclass(frozen=True)
class Project:
    """params.yaml's settings and the absolute folder that its relative `paths` start from.

    `tracking_uri` names the MLflow store when the caller chose one (a Dagster resource); None leaves the choice to
    MLFLOW_TRACKING_URI, then to `mlflow.tracking_uri`.
    """

    params: Params
    root: Path
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @classmethod
    def load(cls, root: str | Path = ".", params_file: str | Path = DEFAULT_PARAMS_FILE) -> Project:
        """The project in `root`, with its parameter file (relative to `root`); a missing file is an error."""
        root = Path(root).resolve()
        return cls(load_params(root / params_file), root)

    def updated(self, overrides: dict[str, Any]) -> Project:
        """The same project with dotted-key parameter overrides ({'train.epochs': 2}), validated like the file."""
        return dataclasses.replace(self, params=self.params.updated(overrides)) if overrides else self

    def with_tracking_uri(self, tracking_uri: str | None) -> Project:
        return dataclasses.replace(self, tracking_uri=tracking_uri)

    # --- the `paths` section -------------------------------------------------------------------------------------

    @property
    def demo(self) -> Path:
        return self.root / self.params.paths.demo

    @property
    def incoming(self) -> Path:
        return self.root / self.params.paths.incoming

    @property
    def ingested(self) -> Path:
        return self.root / self.params.paths.ingested

    @property
    def splits(self) -> Path:
        return self.root / self.params.paths.splits

    @property
    def cache(self) -> Path:
        return self.root / self.params.paths.cache

    @property
    def run(self) -> Path:
        return self.root / self.params.paths.run

    @property
    def model(self) -> Path:
        return self.root / self.params.paths.model

    @property
    def foundation(self) -> Path:
        return self.root / self.params.paths.foundation

    @property
    def reports(self) -> Path:
        return self.root / self.params.paths.reports

    @property
    def taxonomy(self) -> Path:
        return self.root / self.params.paths.taxonomy

    @property
    def validation(self) -> Path:
        return self.root / self.params.paths.validation

    @property
    def unlabelled(self) -> Path:
        return self.root / self.params.paths.unlabelled

    # --- files inside those folders ------------------------------------------------------------------------------

    @property
    def manifest(self) -> Path:
        return self.ingested / "manifest.parquet"

    def split(self, name: str) -> Path:
        return self.splits / f"{name}.parquet"

    @property
    def labels_validation(self) -> Path:
        return self.validation / "labels"

    @property
    def splits_validation(self) -> Path:
        return self.validation / "splits"

    @property
    def foundation_checkpoint(self) -> Path:
        """Where `mumic pretrain` writes the demo foundation of `model.backbone`."""
        return self.foundation / f"{self.params.model.backbone}.safetensors"

    @property
    def foundation_report(self) -> Path:
        return self.foundation / "foundation.json"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def summary(self) -> Path:
        return self.reports / "summary.json"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def gate_report(self) -> Path:
        return self.reports / "gate.json"

    @property
    def registration(self) -> Path:
        return self.reports / "registration.json"

    @property
    def catalogue_tags(self) -> Path:
        """The champion's tags for every photo in `paths.unlabelled` (asset catalogue_tags)."""
        return self.reports / "tags.parquet"

    @property
    def audit(self) -> Path:
        """The label audit's suspects.csv, report.html and audit.json."""
        return self.reports / "audit"

    @property
    def audit_cache(self) -> Path:
        """Image embeddings of the label audit, one folder per image tower."""
        return self.root / ".cache" / "audit"

    @property
    def registered_models_cache(self) -> Path:
        """Registered models downloaded to be measured on this project's test split."""
        return self.root / ".cache" / "models"

    @property
    def dvc_lock(self) -> Path:
        return self.root / "dvc.lock"

    # --- what the files say ------------------------------------------------------------------------------------------

    def foundation_weights(self) -> str | None:
        """What `model.pretrained` names, for `create_backbone`: the demo foundation's checkpoint, or the tag or
        file as configured."""
        pretrained = self.params.model.pretrained
        if pretrained != DEMO_FOUNDATION:
            return pretrained
        checkpoint = self.foundation_checkpoint
        if not checkpoint.is_file():
            raise FileNotFoundError(
                f"model.pretrained is {DEMO_FOUNDATION!r} but {checkpoint} does not exist; build it with "
                "`mumic pretrain` (the foundation_model asset, the DVC stage `pretrain`)"
            )
        return str(checkpoint)

    def data_version(self) -> dict[str, str]:
        """md5 of each split file: names the exact data a model was trained and tested on."""
        return {name: file_digest(self.split(name), DVC_DIGEST) for name in SPLITS}

    def test_images(self) -> frozenset[str]:
        """The sha256 of every test image: what no model compared on this split may have trained on."""
        from mumic_ml.data import read_split

        return frozenset(read_split(self.split("test"))["sha256"])

    def dvc_lock_matches(self, md5s: dict[str, str]) -> dict[str, bool | None]:
        """Whether each split file equals what dvc.lock records (None: dvc.lock does not know it yet)."""
        recorded: dict[str, str] = {}
        if self.dvc_lock.is_file():
            lock = yaml.safe_load(self.dvc_lock.read_text(encoding="utf-8")) or {}
            for stage in (lock.get("stages") or {}).values():
                for out in stage.get("outs", []):
                    recorded[str(out.get("path"))] = str(out.get("md5"))
        splits_rel = self.params.paths.splits
        return {
            name: (recorded[key] == md5 if (key := str(splits_rel / f"{name}.parquet")) in recorded else None)
            for name, md5 in md5s.items()
        }


def combined_version(md5s: dict[str, str]) -> str:
    """One short identifier for the split files together: the data version tag of runs and model versions."""
    joined = ";".join(f"{name}:{md5s[name]}" for name in sorted(md5s))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


DATA_VERSION = "data_version"
SPLIT_MD5_PREFIX = "split_md5."


def data_version_fields(md5s: dict[str, str]) -> dict[str, str]:
    """The data version as every place shows it (MLflow run and model version tags, Dagster metadata, model card):
    `data_version`, one identifier for the split files together, and `split_md5.<split>`, each file's md5 as
    dvc.lock records it."""
    return {DATA_VERSION: combined_version(md5s), **{f"{SPLIT_MD5_PREFIX}{name}": md5 for name, md5 in md5s.items()}}
