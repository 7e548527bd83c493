"""Partial labels end to end: known masks from the split files, masked losses and metrics against hand-computed
values and against deleting the unknown entries, training and evaluation with unknown labels."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file

from mumic_ml.config import AsymmetricLossConfig, Loss, Params
from mumic_ml.data import CachedImageDataset, split_targets
from mumic_ml.evaluate import evaluate_model
from mumic_ml.losses import asymmetric_loss, binary_cross_entropy, tempered_sigmoid_bce
from mumic_ml.metrics import (
    evaluation_report,
    gap_at_k,
    mean_average_precision,
    per_class_average_precision,
    precision_recall_f1,
    tune_thresholds,
)
from mumic_ml.model import ClassifierOutput
from mumic_ml.split import label_lists_as_strings
from mumic_ml.task import create_loss
from mumic_ml.train import train

TOL = 1e-9

# --- known masks from the split files -------------------------------------------------------------------------------


def test_split_targets_mark_unknown_labels_and_only_those():
    frame = pd.DataFrame(
        {
            "labels": [["cat"], [], ["dog", "bird"]],
            "negative_labels": [["dog"], ["cat"], []],
            "unknown_labels": [["bird"], ["dog", "fish"], []],
        }
    )
    targets, known = split_targets(frame, ["cat", "dog", "bird"])
    np.testing.assert_array_equal(targets, [[1, 0, 0], [0, 0, 0], [0, 1, 1]])
    # A verified negative and a class nobody listed are both known; "fish" is not a trained class and is ignored.
    np.testing.assert_array_equal(known, [[True, True, False], [True, False, True], [True, True, True]])
    assert known.dtype == bool

    _, all_known = split_targets(frame.drop(columns="unknown_labels"), ["cat", "dog", "bird"])
    assert all_known.all() and all_known.shape == (3, 3)


def test_dataset_yields_the_known_mask_beside_the_targets(tiny_world):
    from mumic_ml.data import read_split
    from mumic_ml.images import PreprocessCache

    frame = read_split(tiny_world.splits / "val.parquet").head(3)
    targets = np.zeros((3, 2), np.float32)
    cache = PreprocessCache(tiny_world.cache)
    default = CachedImageDataset(frame, tiny_world.ingested, targets, cache, 16, preload=False)
    assert default[0][2].dtype == torch.bool and default[0][2].all()
    known = np.array([[True, False], [True, True], [False, False]])
    masked = CachedImageDataset(frame, tiny_world.ingested, targets, cache, 16, preload=False, known=known)
    assert masked[0][2].tolist() == [True, False] and masked[2][2].tolist() == [False, False]
    with pytest.raises(ValueError, match="known mask"):
        CachedImageDataset(frame, tiny_world.ingested, targets, cache, 16, preload=False, known=known[:, :1])


# --- losses: hand-computed ------------------------------------------------------------------------------------------


def test_masked_tempered_bce_hand_computed():
    # Known: a positive with cosine 0.5 and a negative with cosine 0.2 at T = 0.1 (losses 0.0067153 and 2.126928,
    # as in test_losses). The unknown entry (cosine 0.9, a negative's loss of 9.000123) adds nothing: mean over 2.
    similarity = torch.tensor([[0.5, 0.2, 0.9]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    known = torch.tensor([[True, True, False]])
    loss = tempered_sigmoid_bce(similarity, targets, 0.1, known=known)
    assert loss.item() == pytest.approx((0.0067153 + 2.126928) / 2, abs=1e-6)
    assert tempered_sigmoid_bce(similarity, targets, 0.1).item() == pytest.approx(
        (0.0067153 + 2.126928 + 9.000123) / 3, abs=1e-5
    )


def test_masked_bce_hand_computed():
    # Known: positive at logit 0 (log 2 = 0.693147) and positive at -1 (softplus(1) = 1.313262); the unknown
    # negative at logit 2 is left out of sum and count: (0.693147 + 1.313262) / 2.
    logits = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    known = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    assert binary_cross_entropy(logits, targets, known=known).item() == pytest.approx(1.0032045, abs=1e-6)


def test_masked_asl_hand_computed():
    # Positive x=0: 0.346574; negative x=0: 0.024515; negative x=-5: 0 (below the clip) -- as in test_losses.
    # The unknown fourth entry (a positive at x=-3, loss (1 - 0.047426) * 3.048587 = 2.904006) adds nothing.
    logits = torch.tensor([[0.0, 0.0, -5.0, -3.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    known = torch.tensor([[True, True, True, False]])
    total = 0.346574 + 0.024515
    assert asymmetric_loss(logits, targets, known=known).item() == pytest.approx(total, abs=1e-6)
    assert asymmetric_loss(logits, targets, known=known, reduction="mean").item() == pytest.approx(total / 3, abs=1e-6)
    none = asymmetric_loss(logits, targets, known=known, reduction="none")
    assert none[0, 3].item() == 0.0 and none[0, 0].item() == pytest.approx(0.346574, abs=1e-6)
    assert asymmetric_loss(logits, targets).item() == pytest.approx(total + 2.904006, abs=1e-5)


def test_task_asl_is_normalised_over_known_entries():
    """Unmasked: the per-image sum, averaged over images. Masked: C times the mean over the known entries, which
    is the same number when every entry is known."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g, dtype=torch.float64)
    targets = (torch.rand(4, 5, generator=g) < 0.4).double()
    known = torch.rand(4, 5, generator=g) < 0.7
    out = ClassifierOutput(logits=logits, image_features=torch.zeros(4, 2))
    loss = create_loss(Loss.ASL, AsymmetricLossConfig())
    per_entry = asymmetric_loss(logits, targets, 2.0, 1.0, 0.05, reduction="none")
    assert loss(out, targets, known).item() == pytest.approx(5 * per_entry[known].mean().item(), abs=1e-12)
    assert loss(out, targets, None).item() == pytest.approx(per_entry.sum().item() / 4, abs=1e-12)
    all_known = torch.ones(4, 5, dtype=torch.bool)
    assert loss(out, targets, all_known).item() == pytest.approx(loss(out, targets, None).item(), rel=1e-12)


LOSSES = {
    "tempered_sigmoid_bce": lambda x, y, known: tempered_sigmoid_bce(x, y, 0.2, 0.3, known=known),
    "bce": lambda x, y, known: binary_cross_entropy(x, y, known=known),
    "asl_sum": lambda x, y, known: asymmetric_loss(x, y, known=known),
    "asl_mean": lambda x, y, known: asymmetric_loss(x, y, known=known, reduction="mean"),
}


@pytest.mark.parametrize("name", list(LOSSES))
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_an_unknown_entry_contributes_nothing_to_any_loss(name, n, c, seed):
    """Changing an unknown entry's logit or target changes neither the loss nor any other entry's gradient, and
    its own gradient is 0; the loss equals the unmasked loss of the known entries alone (as one row)."""
    loss_fn = LOSSES[name]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    targets = (torch.rand(n, c, generator=g) < 0.4).double()
    known = torch.rand(n, c, generator=g) < 0.6
    known.view(-1)[0] = True
    x = logits.clone().requires_grad_(True)
    loss = loss_fn(x, targets, known)
    loss.backward()
    assert torch.all(x.grad[~known] == 0)

    other = logits.clone()
    other[~known] = torch.randn(int((~known).sum()), generator=g, dtype=torch.float64) * 5
    flipped = torch.where(known, targets, 1 - targets)
    x2 = other.clone().requires_grad_(True)
    loss2 = loss_fn(x2, flipped, known)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-12)
    assert torch.allclose(x2.grad[known], x.grad[known], atol=1e-12)

    kept = loss_fn(logits[known].reshape(1, -1), targets[known].reshape(1, -1), None)
    assert loss.item() == pytest.approx(kept.item(), abs=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_an_all_known_mask_gives_the_unmasked_loss_and_an_all_unknown_one_gives_zero(name):
    loss_fn = LOSSES[name]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64)
    targets = (torch.rand(3, 4, generator=g) < 0.5).double()
    masked = loss_fn(logits, targets, torch.ones(3, 4, dtype=torch.bool))
    assert masked.item() == pytest.approx(loss_fn(logits, targets, None).item(), rel=1e-12)
    x = logits.clone().requires_grad_(True)
    nothing = loss_fn(x, targets, torch.zeros(3, 4, dtype=torch.bool))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.all(x.grad == 0)


def test_bad_masks_are_refused():
    logits, targets = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        binary_cross_entropy(logits, targets, known=torch.ones(2, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        asymmetric_loss(logits, targets, known=torch.full((2, 3), 0.5))


# --- the default path is the old computation, bit for bit -----------------------------------------------------------


def _tiny_mumic(seed: int = 0):
    from mumic_ml.backbone import create_backbone
    from mumic_ml.model_io import build_classifier
    from mumic_ml.optim import parameter_groups

    torch.manual_seed(seed)
    params = Params()
    model = build_classifier(params.model, [["a red circle."], ["stripes."], ["a cat."]], create_backbone("mumic-tiny"))
    return model, torch.optim.AdamW(parameter_groups(model, params))


def test_the_default_path_computes_loss_and_update_exactly_as_the_unmasked_formula():
    """A step through Stepper without a mask (train.partial_labels off, or a split without unknown labels) gives
    bitwise the loss and the weights of ASL summed per image and averaged over the batch, written out directly."""
    from mumic_ml.optim import Stepper
    from mumic_ml.task import MumicTask

    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 64, 64, generator=g)
    targets = (torch.rand(6, 3, generator=g) < 0.4).float()
    cfg = Params().train

    model, optimizer = _tiny_mumic()
    stepper = Stepper(MumicTask(model, create_loss(cfg.loss, cfg.asl)), optimizer, contextlib.nullcontext, None)
    loss, _ = stepper.backward(images, targets)
    stepper.update(1.0)

    twin, twin_optimizer = _tiny_mumic()
    asl = cfg.asl
    logits = twin(images).logits
    expected = asymmetric_loss(logits, targets, asl.gamma_neg, asl.gamma_pos, asl.clip, reduction="sum") / 6
    expected.backward()
    for group in twin_optimizer.param_groups:
        group["lr"] = group["peak_lr"]
    twin_optimizer.step()
    assert torch.equal(loss, expected.detach())
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


# --- metrics: hand-computed -----------------------------------------------------------------------------------------

SCORES = np.array([[0.9, 0.8, 0.1], [0.7, 0.2, 0.6]])
TARGETS = np.array([[1, 0, 1], [0, 0, 1]])


def test_masked_gap_hand_computed():
    # Unmasked GAP@2 is 0.5 (test_metrics). Hiding image 0's false 0.8 lets its true 0.1 into its top 2:
    # pool 0.9 T, 0.7 F, 0.6 T, 0.1 T -> (1/1 + 2/3 + 3/4) / 3 = 29/36.
    hide_false = np.array([[1, 0, 1], [1, 1, 1]])
    assert gap_at_k(SCORES, TARGETS, k=2, known=hide_false) == pytest.approx(29 / 36, abs=TOL)
    # Every known class pooled: 0.9 T, 0.7 F, 0.6 T, 0.2 F, 0.1 T -> (1 + 2/3 + 3/5) / 3 = 34/45.
    assert gap_at_k(SCORES, TARGETS, k=None, known=hide_false) == pytest.approx(34 / 45, abs=TOL)
    # Hiding the true 0.1: 2 known positives; pool 0.9 T, 0.8 F, 0.7 F, 0.6 T -> (1 + 2/4) / 2 = 3/4.
    hide_true = np.array([[1, 1, 0], [1, 1, 1]])
    assert gap_at_k(SCORES, TARGETS, k=2, known=hide_true) == pytest.approx(0.75, abs=TOL)
    # Image 0 knows one class only, fewer than k: it pools just 0.9 T. Pool 0.9 T, 0.7 F, 0.6 T -> (1 + 2/3) / 2.
    one_known = np.array([[1, 0, 0], [1, 1, 1]])
    assert gap_at_k(SCORES, TARGETS, k=2, known=one_known) == pytest.approx(5 / 6, abs=TOL)


def test_masked_gap_tie_at_the_cut_counts_known_classes_only():
    # All tie at 0.5; k=1. Unmasked, class 0 (false) wins the tie and GAP is 0. With class 0 unknown the first
    # known class in index order, class 1 (true), is taken: precision 1/1 over 1 positive.
    scores, targets = [[0.5, 0.5, 0.5]], [[0, 1, 0]]
    assert gap_at_k(scores, targets, k=1) == 0.0
    assert gap_at_k(scores, targets, k=1, known=[[0, 1, 1]]) == pytest.approx(1.0, abs=TOL)


MAP_SCORES = np.array([[0.9, 0.2, 0.5], [0.8, 0.4, 0.5], [0.3, 0.6, 0.5], [0.1, 0.8, 0.5]])
MAP_TARGETS = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])


def test_masked_average_precision_and_map_hand_computed():
    # Class 0 unmasked: 0.9 T, 0.8 F, 0.3 T, 0.1 F -> 5/6. With image 1 unknown for class 0: 0.9 T, 0.3 T, 0.1 F -> 1.
    # Class 1's only positive (image 3) unknown: no known positive, NaN, so mAP is class 0's AP alone.
    known = np.ones((4, 3), dtype=bool)
    known[1, 0] = known[3, 1] = False
    ap = per_class_average_precision(MAP_SCORES, MAP_TARGETS, known=known)
    assert ap[0] == pytest.approx(1.0, abs=TOL) and np.isnan(ap[1]) and np.isnan(ap[2])
    assert mean_average_precision(MAP_SCORES, MAP_TARGETS, known=known) == pytest.approx(1.0, abs=TOL)
    # Hiding a negative ranked below every positive (image 3 of class 0) changes nothing: 0.9 T, 0.8 F, 0.3 T -> 5/6.
    known = np.ones((4, 3), dtype=bool)
    known[3, 0] = False
    assert per_class_average_precision(MAP_SCORES, MAP_TARGETS, known=known)[0] == pytest.approx(5 / 6, abs=TOL)


def test_masked_map_top_n_counts_known_positives():
    # Unmasked, class 0 has 2 positives and is the majority class. With both unknown, class 1 (AP 1) is chosen.
    known = np.ones((4, 3), dtype=bool)
    known[[0, 2], 0] = False
    assert mean_average_precision(MAP_SCORES, MAP_TARGETS, top_n=1, known=known) == pytest.approx(1.0, abs=TOL)


def test_masked_thresholds_and_precision_recall_hand_computed():
    # Column 0 of test_metrics' threshold case: scores 0.9 .. 0.5, positives at 0.9 and 0.7; best threshold 0.7
    # with F1 4/5. With the 0.8 negative unknown: t=0.9 gives 2*1/(1+2) = 2/3, t=0.7 gives 2*2/(2+2) = 1.
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    targets = np.array([[1], [0], [1], [0], [0]])
    known = np.array([[1], [0], [1], [1], [1]])
    np.testing.assert_array_equal(tune_thresholds(scores, targets, known=known), [0.7])
    result = precision_recall_f1(scores, targets, [0.7], known=known)
    assert result["f1"][0] == pytest.approx(1.0, abs=TOL) and result["micro_precision"] == pytest.approx(1.0)
    # Unmasked, the 0.8 negative is a false positive at 0.7: precision 2/3.
    assert precision_recall_f1(scores, targets, [0.7])["precision"][0] == pytest.approx(2 / 3, abs=TOL)


def test_evaluation_report_counts_unknown_and_known_positives():
    known = np.array([[1, 0, 1], [1, 1, 0]])
    report = evaluation_report(SCORES, TARGETS, ["a", "b", "c"], k=2, known=known)
    assert report["num_unknown"] == 2 and report["num_positives"] == 2
    assert report["gap_at_2"] == pytest.approx(gap_at_k(SCORES, TARGETS, k=2, known=known), abs=TOL)
    assert report["map_macro"] == pytest.approx(mean_average_precision(SCORES, TARGETS, known=known), abs=TOL)
    every = evaluation_report(SCORES, TARGETS, ["a", "b", "c"], known=np.ones((2, 3)))
    assert every["num_unknown"] == 0
    assert {k: v for k, v in every.items() if k != "num_unknown"} == evaluation_report(SCORES, TARGETS, ["a", "b", "c"])


@pytest.mark.parametrize(
    "known, message",
    [(np.ones((2, 2)), "known must have the shape"), (np.full((2, 3), 0.5), "known must be 0/1"), (None, None)],
)
def test_bad_known_masks(known, message):
    if message is None:
        assert gap_at_k(SCORES, TARGETS, known=known) == gap_at_k(SCORES, TARGETS)
        return
    with pytest.raises(ValueError, match=message):
        gap_at_k(SCORES, TARGETS, known=known)


def test_no_known_positive_is_undefined():
    with pytest.raises(ValueError, match="no positive"):
        gap_at_k(SCORES, TARGETS, known=TARGETS == 0)


# --- metrics: masking is deleting -----------------------------------------------------------------------------------


def ragged_gap(rows, k):
    """GAP@k over images whose rows hold only their known classes: (class index, score, target) per entry."""
    pool = []
    for row in rows:
        ranked = sorted(row, key=lambda entry: (-entry[1], entry[0]))
        pool += [(score, target) for _, score, target in (ranked if k is None else ranked[:k])]
    num_positives = sum(target for row in rows for _, _, target in row)
    pool.sort(key=lambda entry: -entry[0])
    total, hits, i = 0.0, 0, 0
    while i < len(pool):
        end = i
        while end < len(pool) and pool[end][0] == pool[i][0]:
            end += 1
        block_hits = sum(target for _, target in pool[i:end])
        hits += block_hits
        total += block_hits * hits / end
        i = end
    return total / num_positives


@st.composite
def masked_case(draw):
    """Scores on a coarse grid (ties), 0/1 targets and a known mask, with at least one known positive."""
    shape = draw(st.tuples(st.integers(1, 10), st.integers(1, 6)))
    scores = draw(hnp.arrays(np.int64, shape, elements=st.integers(-4, 4))) / 10.0
    targets = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 1)))
    known = draw(hnp.arrays(np.bool_, shape))
    spot = draw(st.integers(0, targets.size - 1))
    targets.flat[spot], known.flat[spot] = 1, True
    return scores, targets, known


@settings(max_examples=80, deadline=None)
@given(masked_case(), st.one_of(st.none(), st.integers(1, 7)))
def test_masked_gap_is_gap_of_the_rows_with_unknown_entries_deleted(case, k):
    scores, targets, known = case
    rows = [
        [(c, float(scores[i, c]), int(targets[i, c])) for c in range(scores.shape[1]) if known[i, c]]
        for i in range(scores.shape[0])
    ]
    assert gap_at_k(scores, targets, k=k, known=known) == pytest.approx(ragged_gap(rows, k), abs=TOL)


@settings(max_examples=60, deadline=None)
@given(masked_case())
def test_masked_gap_over_all_classes_is_the_ap_of_the_known_pairs(case):
    scores, targets, known = case
    pairs = gap_at_k(scores[known].reshape(1, -1), targets[known].reshape(1, -1), k=None)
    assert gap_at_k(scores, targets, k=None, known=known) == pytest.approx(pairs, abs=TOL)


@settings(max_examples=80, deadline=None)
@given(masked_case())
def test_masked_per_class_ap_is_ap_on_the_rows_kept(case):
    scores, targets, known = case
    ap = per_class_average_precision(scores, targets, known=known)
    kept_aps = []
    for c in range(scores.shape[1]):
        rows = known[:, c]
        if targets[rows, c].any():
            kept = per_class_average_precision(scores[rows][:, [c]], targets[rows][:, [c]])[0]
            assert ap[c] == pytest.approx(kept, abs=TOL)
            kept_aps.append(kept)
        else:
            assert np.isnan(ap[c])
    assert mean_average_precision(scores, targets, known=known) == pytest.approx(np.mean(kept_aps), abs=TOL)


@settings(max_examples=60, deadline=None)
@given(masked_case(), st.one_of(st.none(), st.integers(1, 7)))
def test_masking_whole_images_is_deleting_them(case, k):
    scores, targets, known = case
    kept_rows = known.any(axis=1)
    known = np.repeat(kept_rows[:, None], scores.shape[1], axis=1)
    kept_scores, kept_targets = scores[kept_rows], targets[kept_rows]
    assert gap_at_k(scores, targets, k=k, known=known) == pytest.approx(
        gap_at_k(kept_scores, kept_targets, k=k), abs=TOL
    )
    assert mean_average_precision(scores, targets, known=known) == pytest.approx(
        mean_average_precision(kept_scores, kept_targets), abs=TOL
    )
    thresholds = tune_thresholds(scores, targets, known=known)
    np.testing.assert_array_equal(thresholds, tune_thresholds(kept_scores, kept_targets))
    masked_prf = precision_recall_f1(scores, targets, thresholds, known=known)
    kept_prf = precision_recall_f1(kept_scores, kept_targets, thresholds)
    for key in ("f1", "precision", "recall"):
        np.testing.assert_allclose(masked_prf[key], kept_prf[key], atol=TOL)


@settings(max_examples=60, deadline=None)
@given(masked_case(), st.one_of(st.none(), st.integers(1, 7)))
def test_an_all_known_mask_gives_the_unmasked_numbers_exactly(case, k):
    scores, targets, _ = case
    every = np.ones(scores.shape, dtype=bool)
    assert gap_at_k(scores, targets, k=k, known=every) == gap_at_k(scores, targets, k=k)
    np.testing.assert_array_equal(
        per_class_average_precision(scores, targets, known=every), per_class_average_precision(scores, targets)
    )


# --- training and evaluation with unknown labels --------------------------------------------------------------------


def _hide(frame: pd.DataFrame, class_names: list[str], fraction: float, seed: int) -> pd.DataFrame:
    """A copy whose hidden (image, class) entries moved to `unknown_labels` (positives leave `labels`)."""
    hidden = np.random.default_rng(seed).random((len(frame), len(class_names))) < fraction
    frame = frame.copy()
    frame["unknown_labels"] = [[n for n, h in zip(class_names, row) if h] for row in hidden]
    frame["labels"] = [
        [label for label in labels if label not in set(unknown)]
        for labels, unknown in zip(frame["labels"], frame["unknown_labels"])
    ]
    return frame


@pytest.fixture(scope="module")
def hidden_splits(tiny_world, tmp_path_factory):
    """The tiny world's splits with 30% of train entries and 20% of test entries unknown (val kept clean)."""
    from mumic_ml.data import read_split
    from mumic_ml.taxonomy import load_taxonomy

    names = load_taxonomy(tiny_world.taxonomy).names
    out = tmp_path_factory.mktemp("hidden_splits")
    for split, fraction in (("train", 0.3), ("val", 0.0), ("test", 0.2)):
        frame = _hide(read_split(tiny_world.splits / f"{split}.parquet"), names, fraction, seed=1)
        pq.write_table(
            label_lists_as_strings(pa.Table.from_pandas(frame, preserve_index=False)), out / f"{split}.parquet"
        )
    return out


def _train(world, splits, tmp_path, **overrides):
    params = Params().updated(
        {"train.batch_size": 16, "train.epochs": 1, "train.early_stopping_patience": None, **overrides}
    )
    return train(
        params,
        splits_dir=splits,
        images_root=world.ingested,
        taxonomy_path=world.taxonomy,
        run_dir=tmp_path / "run",
        model_dir=tmp_path / "model",
        cache_dir=world.cache,
        progress=False,
    )


@pytest.mark.slow
def test_partial_labels_without_unknown_labels_trains_bitwise_like_the_default(tiny_world, tmp_path):
    _train(tiny_world, tiny_world.splits, tmp_path / "default")
    _train(tiny_world, tiny_world.splits, tmp_path / "partial", **{"train.partial_labels": True})
    default = load_file(tmp_path / "default" / "model" / "model.safetensors")
    partial = load_file(tmp_path / "partial" / "model" / "model.safetensors")
    assert default.keys() == partial.keys()
    assert all(torch.equal(default[name], partial[name]) for name in default)


def test_unknown_labels_are_masked_in_training_and_left_out_of_evaluation(tiny_world, hidden_splits, tmp_path):
    from mumic_ml.data import read_split
    from mumic_ml.model_io import load_model_dir

    masked = _train(tiny_world, hidden_splits, tmp_path / "masked", **{"train.partial_labels": True})
    negative = _train(tiny_world, hidden_splits, tmp_path / "negative")
    assert masked.history[0]["train_loss"] != negative.history[0]["train_loss"]
    assert math.isfinite(masked.history[0]["train_loss"])

    report = evaluate_model(
        tmp_path / "masked" / "model",
        hidden_splits / "test.parquet",
        tiny_world.ingested,
        tmp_path / "metrics.json",
        cache_dir=tiny_world.cache,
    )
    loaded = load_model_dir(tmp_path / "masked" / "model")
    targets, known = split_targets(read_split(hidden_splits / "test.parquet"), loaded.class_names)
    assert report["num_unknown"] == int((~known).sum()) > 0
    assert report["num_positives"] == int((targets * known).sum())
    clean = evaluate_model(
        tmp_path / "masked" / "model",
        tiny_world.splits / "test.parquet",
        tiny_world.ingested,
        tmp_path / "clean.json",
        cache_dir=tiny_world.cache,
    )
    assert clean["num_unknown"] == 0 and clean["gap_at_10"] != report["gap_at_10"]
