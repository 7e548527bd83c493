"""Training against missing labels: the Large Loss modification by hand on a tiny batch, WiSE-FT and audit
pseudo-labels end to end."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import _train as train_in

from mumic_ml import optim
from mumic_ml.backbone import create_backbone
from mumic_ml.config import Loss, Params, PseudoLabelMode
from mumic_ml.io import read_json
from mumic_ml.label_noise import pseudo_label
from mumic_ml.losses import LargeLossModification, large_loss_rate, large_loss_selection
from mumic_ml.model import encode_text
from mumic_ml.model_io import build_classifier, load_model_dir, weight_space_ensemble
from mumic_ml.optim import fit_head_on_features
from mumic_ml.task import create_loss

# Negatives by logit: (0,3) 3.0 > (0,2) 0.5 > (1,2) 0.0 > (1,3) -0.5 > (0,1) -1.0 > (1,0) -2.0; the positive (0,0)
# has a higher logit than most of them and must never be picked.
LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0], [-2.0, 1.0, 0.0, -0.5]])
TARGETS = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])


def _bce(z: float, y: float) -> float:
    return math.log1p(math.exp(-z)) if y else math.log1p(math.exp(z))


def _selected(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(index) for index in mask.nonzero().tolist()}


def test_rate_grows_linearly_from_zero_in_the_first_epoch_to_the_cap():
    assert [large_loss_rate(e, 0.05, 0.2) for e in range(6)] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert large_loss_rate(3, 0.002, 0.5) == pytest.approx(0.006)  # the paper's delta_rel
    with pytest.raises(ValueError, match="epoch"):
        large_loss_rate(-1, 0.05, 0.2)


def test_the_largest_loss_negatives_are_picked_never_a_positive():
    # 8 known entries x 0.25 = 2: the two negatives with the highest logits, not the positive at 2.0.
    assert _selected(large_loss_selection(LOGITS, TARGETS, None, 0.25)) == {(0, 3), (0, 2)}
    # ceil(8 x 0.3) = 3
    assert _selected(large_loss_selection(LOGITS, TARGETS, None, 0.3)) == {(0, 3), (0, 2), (1, 2)}
    assert not large_loss_selection(LOGITS, TARGETS, None, 0.0).any()
    # At most every negative: the two positives are left whatever the rate.
    everything = large_loss_selection(LOGITS, TARGETS, None, 0.99)
    assert _selected(everything) == {(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)}


def test_unknown_entries_are_neither_picked_nor_counted():
    known = torch.ones_like(TARGETS, dtype=torch.bool)
    known[0, 3] = False  # the largest-loss negative is unknown: 7 known entries x 0.25 -> ceil(1.75) = 2
    assert _selected(large_loss_selection(LOGITS, TARGETS, known, 0.25)) == {(0, 2), (1, 2)}
    known[0, 2] = known[1, 2] = known[1, 3] = False  # 4 known x 0.25 = 1
    assert _selected(large_loss_selection(LOGITS, TARGETS, known, 0.25)) == {(0, 1)}


def test_rejection_leaves_the_picked_negatives_out_of_the_mean_hand_computed():
    ll = LargeLossModification(create_loss(Loss.BCE), "reject", rate_per_epoch=0.125, max_rate=0.5)
    out = SimpleNamespace(logits=LOGITS)
    ll.epoch = 2  # rate 0.25: (0,3) and (0,2) rejected, the mean runs over the other six entries
    kept = [(2.0, 1), (-1.0, 0), (-2.0, 0), (1.0, 1), (0.0, 0), (-0.5, 0)]
    assert float(ll(out, TARGETS)) == pytest.approx(sum(_bce(z, y) for z, y in kept) / 6, rel=1e-6)


def test_correction_counts_the_picked_negatives_as_positives_hand_computed():
    ll = LargeLossModification(create_loss(Loss.BCE), "correct", rate_per_epoch=0.125, max_rate=0.5)
    out = SimpleNamespace(logits=LOGITS)
    ll.epoch = 2
    entries = [(2.0, 1), (-1.0, 0), (0.5, 1), (3.0, 1), (-2.0, 0), (1.0, 1), (0.0, 0), (-0.5, 0)]
    assert float(ll(out, TARGETS)) == pytest.approx(sum(_bce(z, y) for z, y in entries) / 8, rel=1e-6)
    assert TARGETS[0, 3] == 0  # the correction is for this step only


@pytest.mark.parametrize("mode", ["reject", "correct"])
@pytest.mark.parametrize("kind", [Loss.BCE, Loss.ASL])
def test_the_first_epoch_is_the_plain_loss(mode, kind):
    plain = create_loss(kind)
    ll = LargeLossModification(plain, mode, rate_per_epoch=0.5, max_rate=0.9)
    out = SimpleNamespace(logits=LOGITS)
    assert torch.equal(ll(out, TARGETS), plain(out, TARGETS))
    ll.epoch = 1
    assert not torch.equal(ll(out, TARGETS), plain(out, TARGETS))


def test_rejection_under_asl_keeps_its_per_image_scale():
    """ASL with a mask is its mean over known entries x classes: with nothing rejected, its usual sum / batch."""
    asl = create_loss(Loss.ASL)
    out = SimpleNamespace(logits=LOGITS)
    known = torch.ones_like(TARGETS, dtype=torch.bool)
    known[0, 3] = known[0, 2] = False
    ll = LargeLossModification(asl, "reject", rate_per_epoch=0.25, max_rate=0.5)
    ll.epoch = 1
    assert float(ll(out, TARGETS)) == pytest.approx(float(asl(out, TARGETS, known)), rel=1e-6)


def test_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        LargeLossModification(create_loss(Loss.BCE), "drop", 0.1, 0.2)


def test_weight_space_ensemble_mixes_every_tuned_tensor_and_keeps_a_linear_head():
    backbone = create_backbone("mumic-tiny", None)
    for head in ("mumic", "linear"):
        cfg = Params().updated({"model.head": head, "train.loss": "asl"}).model
        classifier = build_classifier(cfg, [["a cat"], ["a dog"]], backbone)
        start = {k: v.clone() for k, v in classifier.state_dict().items()}
        tuned = {k: v + 1.0 if v.is_floating_point() else v for k, v in start.items()}
        for alpha in (0.0, 0.25, 1.0):
            mixed = weight_space_ensemble(classifier, start, tuned, alpha)
            for name, value in mixed.items():
                if name.startswith("head."):
                    assert torch.equal(value, tuned[name]), name
                elif value.is_floating_point():
                    assert torch.allclose(value, start[name] + alpha, atol=1e-6), (head, name, alpha)
    with pytest.raises(ValueError, match="alpha"):
        weight_space_ensemble(classifier, start, tuned, 1.5)


@pytest.fixture(scope="module")
def foundation(tmp_path_factory):
    """A random-init mumic-tiny saved as a checkpoint file: the weights fine-tuning starts from."""
    path = tmp_path_factory.mktemp("foundation") / "mumic-tiny.safetensors"
    torch.manual_seed(123)
    clip = create_backbone("mumic-tiny", None).clip
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, path)
    return path


def _train(world, root, foundation, model="model", resume=False, **overrides):
    params = Params().updated(
        {
            "model.pretrained": str(foundation),
            "train.batch_size": 16,
            "train.epochs": 1,
            "train.early_stopping_patience": None,
            **overrides,
        }
    )
    return train_in(world, root, params, model=model, resume=resume)


@pytest.mark.slow
def test_wise_ft_alpha_one_is_the_fine_tuned_model_and_zero_the_foundation(tiny_world, tmp_path, foundation):
    """One fine-tuning, exported again by resuming its finished run with each WiSE-FT setting (WiSE-FT acts only at
    export, so it does not change the run's signature)."""
    plain = _train(tiny_world, tmp_path, foundation)
    tuned = load_file(plain.model_dir / "model.safetensors")

    one = _train(tiny_world, tmp_path, foundation, model="alpha1", **{"train.wise_ft.alpha": 1.0}, resume=True)
    assert one.resumed_from is not None and one.epochs_run == 1
    assert load_file(one.model_dir / "model.safetensors").keys() == tuned.keys()
    assert all(torch.equal(v, tuned[k]) for k, v in load_file(one.model_dir / "model.safetensors").items())

    zero = _train(tiny_world, tmp_path, foundation, model="alpha0", **{"train.wise_ft.alpha": 0.0}, resume=True)
    assert zero.resumed_from is not None
    loaded = load_model_dir(zero.model_dir)  # the normal loader
    assert read_json(zero.model_dir / "model.json")["metadata"]["wise_ft"]["alpha"] == 0.0
    start = create_backbone("mumic-tiny", str(foundation)).clip.eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.classifier.clip.encode_image(images), start.encode_image(images), atol=1e-6)
        tokens = loaded.classifier.prompt_tokens
        assert torch.allclose(encode_text(loaded.classifier.clip, tokens), encode_text(start, tokens), atol=1e-6)
    assert torch.count_nonzero(loaded.classifier.class_residual) == 0
    assert float(loaded.classifier.temperature.detach()) == pytest.approx(Params().model.init_temperature)
    fine_tuned = load_model_dir(plain.model_dir)
    with torch.no_grad():
        assert not torch.allclose(fine_tuned.classifier.clip.encode_image(images), start.encode_image(images))

    grid = _train(
        tiny_world, tmp_path, foundation, model="grid", **{"train.wise_ft.alpha_grid": [0.0, 0.5, 1.0]}, resume=True
    )
    record = read_json(grid.model_dir / "model.json")["metadata"]["wise_ft"]
    assert set(record["val_gap_at_k"]) == {"0", "0.5", "1"}
    best = max(record["val_gap_at_k"].values())
    assert record["val_gap_at_k"][f"{record['alpha']:g}"] == best
    assert read_json(grid.run_dir / "result.json")["wise_ft"] == record
    assert load_model_dir(grid.model_dir).thresholds is not None


@pytest.mark.slow
def test_large_loss_changes_training_from_the_second_epoch_and_only_its_runs_signature(
    tiny_world, tmp_path, foundation
):
    two = {"train.epochs": 2}
    plain = _train(tiny_world, tmp_path / "plain", foundation, **two)
    # Off, its other settings do not count: the finished run resumes.
    again = _train(
        tiny_world,
        tmp_path / "plain",
        foundation,
        **two,
        **{
            "train.large_loss.rate_per_epoch": 0.3,
        },
        resume=True,
    )
    assert again.resumed_from is not None and again.history == plain.history

    # On, it belongs to the signature: in the plain run's folder it starts afresh instead of resuming.
    for mode, folder in (("reject", "plain"), ("correct", "correct")):
        resume = folder == "plain"
        ll = _train(tiny_world, tmp_path / folder, foundation, **two, **{"train.large_loss.mode": mode}, resume=resume)
        assert ll.resumed_from is None
        assert ll.history[0]["train_loss"] == plain.history[0]["train_loss"]  # rate 0 in the first epoch
        assert ll.history[1]["train_loss"] != plain.history[1]["train_loss"]
        assert np.isfinite(ll.history[1]["train_loss"])


# --- audit pseudo-labels ----------------------------------------------------------------------------------------


def test_pseudo_labels_flip_only_known_rankable_negatives_at_or_above_the_score():
    targets = np.array([[1, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    known = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)  # (0, 3) unknown
    rankable = np.array([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=bool)  # (1, 0) a verified negative
    scores = np.array([[0.9, 0.6, 0.59, 0.99], [0.95, 0.2, 0.1, 0.6]], dtype=np.float32)
    # Flipped: (0, 1) at 0.6 and (1, 3) at 0.6 (inclusive); not the positive (0, 0), (0, 2) below, the unknown
    # (0, 3), the verified negative (1, 0).
    want = {(0, 1), (1, 3)}

    new_targets, new_known, flagged = pseudo_label(targets, known, rankable, scores, PseudoLabelMode.POSITIVE, 0.6)
    assert {tuple(i) for i in np.argwhere(flagged)} == want
    assert new_targets.dtype == targets.dtype
    assert np.array_equal(new_targets, np.array([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=np.float32))
    assert np.array_equal(new_known, known)

    new_targets, new_known, flagged = pseudo_label(targets, known, rankable, scores, PseudoLabelMode.UNKNOWN, 0.6)
    assert {tuple(i) for i in np.argwhere(flagged)} == want
    assert np.array_equal(new_targets, targets)
    assert {tuple(i) for i in np.argwhere(~new_known)} == want | {(0, 3)}


def test_pseudo_labels_need_starting_weights(tiny_world, tmp_path):
    params = Params().updated({"model.pretrained": None, "train.pseudo_labels.mode": "positive"})
    with pytest.raises(ValueError, match="train.pseudo_labels needs model.pretrained"):
        train_in(tiny_world, tmp_path, params)


@pytest.mark.slow
def test_pseudo_labels_train_on_the_flipped_labels_and_record_them(tiny_world, tmp_path, foundation):
    plain = _train(tiny_world, tmp_path / "plain", foundation)
    # A score no probability reaches flips nothing: the same training as without pseudo-labels.
    none = _train(
        tiny_world,
        tmp_path / "none",
        foundation,
        **{"train.pseudo_labels.mode": "positive", "train.pseudo_labels.min_score": 0.999999},
    )
    assert none.history[0]["train_loss"] == plain.history[0]["train_loss"]
    record = read_json(none.model_dir / "model.json")["metadata"]["pseudo_labels"]
    assert record["entries"] == 0 and record["negatives"] > 0

    for mode in ("positive", "unknown"):
        low = {"train.pseudo_labels.mode": mode, "train.pseudo_labels.min_score": 0.05}
        run = _train(tiny_world, tmp_path / mode, foundation, **low)
        record = read_json(run.model_dir / "model.json")["metadata"]["pseudo_labels"]
        assert record["mode"] == mode and 0 < record["entries"] <= record["negatives"]
        assert run.pseudo_labels == record  # what the MLflow run and the trained_model asset show
        assert run.history[0]["train_loss"] != plain.history[0]["train_loss"]
        assert np.isfinite(run.history[0]["train_loss"])
        # On, the settings belong to the run's signature: the plain run's folder is not resumed.
        assert _train(tiny_world, tmp_path / "plain", foundation, **low, resume=True).resumed_from is None


# --- linear probe, then fine-tune (LP-FT) -----------------------------------------------------------------------


@pytest.mark.parametrize("head", ["mumic", "linear"])
def test_fitting_the_head_first_moves_only_the_head_and_lowers_the_training_loss(head):
    torch.manual_seed(0)
    params = Params().updated({"model.pretrained": None, "model.head": head})
    prompts = [[f"a photo of {name}"] for name in ("red", "green", "blue", "cats")]
    classifier = build_classifier(params.model, prompts, create_backbone("mumic-tiny", None))
    towers = {k: v.clone() for k, v in classifier.clip.state_dict().items()}
    heads = {k: v.detach().clone() for k, v in classifier.named_parameters() if not k.startswith("clip.")}
    dim = classifier.image_features(torch.zeros(1, 3, 64, 64)).shape[1]
    features = torch.nn.functional.normalize(torch.randn(40, dim), dim=-1)
    targets = (features[:, :4] > 0).float()  # a linear function of the features
    loss_fn = create_loss(params.train.loss, params.train.asl)
    classifier.eval()
    with torch.no_grad():
        start_loss = float(loss_fn(classifier.score_features(features), targets, None))

    before, after = fit_head_on_features(
        classifier, features, targets, None, loss_fn, steps=50, lr=0.03, weight_decay=0
    )

    assert before == pytest.approx(start_loss)
    assert after < 0.7 * before
    assert not classifier.training
    assert all(torch.equal(v, towers[k]) for k, v in classifier.clip.state_dict().items())
    moved = {k for k, v in classifier.named_parameters() if k in heads and not torch.equal(v, heads[k])}
    trainable = {k for k, v in classifier.named_parameters() if k in heads and v.requires_grad}
    assert moved == trainable and trainable


def test_fitting_the_head_first_leaves_unknown_entries_out():
    """With every entry of a class unknown, its targets cannot matter: flipping them changes nothing."""
    torch.manual_seed(0)
    params = Params().updated({"model.pretrained": None, "model.head": "linear"})
    features = torch.nn.functional.normalize(torch.randn(30, 64), dim=-1)
    targets = (features[:, :3] > 0).float()
    known = torch.ones_like(targets)
    known[:, 2] = 0
    loss_fn = create_loss(params.train.loss, params.train.asl)
    fitted = []
    for column in (targets[:, 2], 1 - targets[:, 2]):
        torch.manual_seed(1)
        classifier = build_classifier(params.model, [["a"], ["b"], ["c"]], create_backbone("mumic-tiny", None))
        classifier.head = torch.nn.Linear(64, 3)
        y = targets.clone()
        y[:, 2] = column
        fit_head_on_features(classifier, features, y, known, loss_fn, steps=20, lr=0.03, weight_decay=0)
        fitted.append(classifier.head.weight.detach().clone())
    assert torch.equal(fitted[0], fitted[1])


@pytest.mark.slow
def test_the_linear_probe_fits_the_head_before_the_first_step_and_is_recorded(tiny_world, tmp_path, foundation):
    plain = _train(tiny_world, tmp_path / "plain", foundation)
    probe = {"train.linear_probe.steps": 30}
    run = _train(tiny_world, tmp_path / "probe", foundation, **probe)
    record = read_json(run.model_dir / "model.json")["metadata"]["linear_probe"]
    assert record["steps"] == 30 and record["loss_after"] < record["loss_before"]
    assert run.history[0]["train_loss"] < plain.history[0]["train_loss"]  # the epoch starts from a fitted head
    # On, the setting belongs to the run's signature: the plain run's folder is not resumed.
    assert _train(tiny_world, tmp_path / "plain", foundation, **probe, resume=True).resumed_from is None
    # A resumed run keeps the head its checkpoint holds instead of fitting it again.
    again = _train(tiny_world, tmp_path / "probe", foundation, **probe, resume=True)
    assert again.resumed_from is not None and again.history == run.history
    assert read_json(again.model_dir / "model.json")["metadata"]["linear_probe"] == record


def test_fitting_the_head_in_chunks_is_the_full_batch_fit(monkeypatch):
    """A collection too large for one forward pass is fitted in chunks whose gradients add up to the full batch's."""
    params = Params().updated({"model.pretrained": None, "model.head": "linear"})
    features = torch.nn.functional.normalize(torch.randn(50, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    targets = (features[:, :3] > 0).float()
    loss_fn = create_loss(params.train.loss, params.train.asl)
    fitted = {}
    for entries in (1 << 24, 3 * 7):  # one chunk; chunks of 7 rows (the last one 1 row)
        monkeypatch.setattr(optim, "HEAD_FIT_CHUNK_ENTRIES", entries)
        torch.manual_seed(1)
        classifier = build_classifier(params.model, [["a"], ["b"], ["c"]], create_backbone("mumic-tiny", None))
        classifier.head = torch.nn.Linear(64, 3)
        losses = fit_head_on_features(classifier, features, targets, None, loss_fn, steps=10, lr=0.03, weight_decay=0)
        fitted[entries] = (losses, classifier.head.weight.detach().clone())
    (whole_losses, whole), (chunked_losses, chunked) = fitted.values()
    assert chunked_losses == pytest.approx(whole_losses, rel=1e-5)
    assert torch.allclose(chunked, whole, atol=1e-5)
