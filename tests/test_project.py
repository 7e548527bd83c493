"""A project's paths, data version and dvc.lock comparison, independent of the current directory."""

import hashlib
from pathlib import Path

import pytest
import yaml

from mumic_ml.config import ConfigError, Params, PathsConfig
from mumic_ml.io import file_digest
from mumic_ml.project import SPLITS, Project, combined_version


def test_every_configured_path_is_a_property_under_the_absolute_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = Project(Params(), Path("project"))
    assert project.root == tmp_path / "project"
    for name in PathsConfig.model_fields:
        assert getattr(project, name) == tmp_path / "project" / getattr(project.params.paths, name), name
    monkeypatch.chdir(Path(__file__).parent)
    assert project.model == tmp_path / "project" / "models" / "mumic"


def test_a_misspelt_path_is_an_attribute_error():
    with pytest.raises(AttributeError):
        Project(Params(), Path("/srv/p")).modle  # noqa: B018


def test_load_reads_the_projects_params_yaml_and_refuses_a_missing_one(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    assert Project.load(tmp_path).params.train.epochs == 2
    with pytest.raises(ConfigError, match="parameter file not found"):
        Project.load(tmp_path / "elsewhere")


def test_data_version_is_the_md5_that_dvc_lock_records(tmp_path):
    project = Project(Params(), tmp_path)
    project.splits.mkdir(parents=True)
    for name in SPLITS:
        project.split(name).write_bytes(name.encode() * 100)
    version = project.data_version()
    assert version == {name: hashlib.md5(name.encode() * 100, usedforsecurity=False).hexdigest() for name in SPLITS}
    assert project.dvc_lock_matches(version) == dict.fromkeys(SPLITS)  # no dvc.lock yet

    outs = [{"path": f"data/splits/{name}.parquet", "md5": version[name]} for name in ("train", "val")]
    outs.append({"path": "data/splits/test.parquet", "md5": "0" * 32})
    project.dvc_lock.write_text(yaml.safe_dump({"stages": {"split": {"outs": outs}}}))
    assert project.dvc_lock_matches(version) == {"train": True, "val": True, "test": False}
    assert combined_version(version) == combined_version(dict(reversed(version.items())))


def test_one_digest_helper_for_sha256_and_md5(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 5000)
    assert file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
