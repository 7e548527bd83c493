"""params.yaml loads into typed objects; every mistake names the key."""

from pathlib import Path

import pytest
import yaml

from mumic_ml.config import ConfigError, Head, Loss, Params, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_file_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    assert params.model.head is Head.MUMIC
    assert params.train.loss is Loss.ASL
    # Every key of the schema is spelled out in params.yaml, so DVC can track each one.
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    dumped = params.model_dump(mode="json")
    for section, values in dumped.items():
        assert set(written[section]) == set(values), section


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"lr_imag": 0.1}}, "train.lr_imag: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
        ({"train": {"loss": "hinge"}}, "train.loss"),
        ({"train": {"device": "tpu"}}, "train.device"),
        ({"model": {"init_temperature": -1}}, "model.init_temperature"),
        ({"split": {"fractions": {"train": 0.5, "val": 0.2, "test": 0.2}}}, "must sum to 1"),
        ({"split": {"fractions": {"train": 0.8, "test": 0.2}}}, "missing ['val']"),
        ({"ingest": {"min_side": 600, "max_side": 512}}, "min_side"),
        ({"model": {"head": "linear"}, "train": {"loss": "tempered_sigmoid_bce"}}, "needs model.head 'mumic'"),
        ({"train": {"loss": "bce"}}, "not 'bce'"),
        ({"train": {"label_noise": {"missing": 1.0}}}, "train.label_noise.missing"),
        ({"train": {"large_loss": {"mode": "drop"}}}, "train.large_loss.mode"),
        ({"train": {"large_loss": {"max_rate": 1.0}}}, "train.large_loss.max_rate"),
        ({"train": {"wise_ft": {"alpha": 1.5}}}, "train.wise_ft.alpha"),
        ({"train": {"wise_ft": {"alpha_grid": [0.5, 2.0]}}}, "train.wise_ft.alpha_grid"),
        ({"train": {"wise_ft": {"alpha": 0.5, "alpha_grid": [0.5]}}}, "set alpha or alpha_grid, not both"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as exc:
        params_from_dict(data, source="params.yaml")
    assert message in str(exc.value)
    assert str(exc.value).startswith("params.yaml:")


def test_linear_baseline_configuration_is_valid():
    params = params_from_dict({"model": {"head": "linear"}, "train": {"loss": "bce"}})
    assert params.model.head is Head.LINEAR


def test_overrides_are_validated_and_dotted():
    params = Params().updated({"train.epochs": 2, "model.learn_bias": True})
    assert params.train.epochs == 2 and params.model.learn_bias
    with pytest.raises(ConfigError, match="unknown parameter 'train.epoch'"):
        Params().updated({"train.epoch": 2})
    with pytest.raises(ConfigError, match="train.epochs"):
        Params().updated({"train.epochs": -1})


def test_params_are_frozen():
    with pytest.raises(Exception, match="frozen"):
        Params().train.epochs = 3  # type: ignore[misc]


def test_a_missing_params_yaml_is_an_error_naming_it_not_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="parameter file not found") as exc:
        load_params("params.yaml")
    assert str(tmp_path / "params.yaml") in str(exc.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(listy)


def test_robust_training_options_are_off_by_default_and_read_from_params_yaml():
    params = load_params(REPO / "params.yaml")
    assert params.train.large_loss.mode is None and not params.train.wise_ft.enabled
    on = Params().updated({"train.large_loss.mode": "reject", "train.wise_ft.alpha_grid": [0.5, 1.0]})
    assert on.train.large_loss.mode.value == "reject" and on.train.wise_ft.enabled
