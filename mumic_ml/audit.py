"""Label audit (`mumic audit`, asset `label_audit`): which training labels look wrong, and how a reviewer fixes them.

Every training image gets an out-of-fold score per class by k-fold cross-fitting: a linear head is fitted on the
image embeddings of the other folds and scores the held-out fold, so no score comes from a head that saw the
image's own labels. A high score on a class labelled absent is a suspected missing label; a low score on a class
labelled present a suspected wrong one. The embeddings come from a frozen image tower, computed once and cached
by the weights' digest and the image's content hash.

The tower is the foundation by default (`audit.backbone`): the fine-tuned model's tower was trained on these very
labels, so its embedding of a mislabelled image already leans towards the wrong label and the cross-fitted head
would inherit the mistake; the foundation never saw a label. `audit.backbone: model` uses the fine-tuned tower
anyway (benchmarks/audit.py measures both).

The reviewer works through `report.html` (thumbnails inline), marks each suspect accept or reject and downloads the
reviewed CSV; `mumic audit --apply reviewed.csv` turns it into a correction batch in the incoming folder, whose rows
replace the labels of their images when the batches are combined (`batches.CORRECTION_COLUMN`). A decision is a
verification: an accepted missing label becomes a label, an accepted wrong label and a rejected missing one become
verified negatives (`negative_labels`), so the next audit does not raise them again.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mumic_ml.batches import CORRECTION_COLUMN
from mumic_ml.config import AuditConfig
from mumic_ml.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
from mumic_ml.io import atomic_directory, atomic_path, atomic_write_json, atomic_write_text, file_digest
from mumic_ml.manifest import QUALIFIED_LABEL_COLUMNS
from mumic_ml.taxonomy import Taxonomy

log = logging.getLogger(__name__)

MISSING = "missing"
WRONG = "wrong"
KINDS = (MISSING, WRONG)
ACCEPT = "accept"
REJECT = "reject"
DECISIONS = (ACCEPT, REJECT)
CSV_COLUMNS = ("image", "class", "kind", "score", "rank", "source", "decision")
REVIEW_REQUIRED = ("image", "class", "kind", "decision")
CORRECTIONS_PREFIX = "corrections-"
THUMBNAIL_SIDE = 96
# A fitted head: rows of embeddings in, a (rows x classes) probability matrix out.
Predict = Callable[[np.ndarray], np.ndarray]
FitHead = Callable[[np.ndarray, np.ndarray, np.ndarray], Predict]


class AuditError(ValueError):
    """A reviewed list or an audit input the user has to fix; the message says where."""


# --- cross-fitting -----------------------------------------------------------------------------------------------


def assign_folds(shas: Sequence[str], folds: int, seed: int) -> np.ndarray:
    """Fold of each image: a seeded deal of the images in content-hash order, so it does not depend on row order."""
    if folds < 2:
        raise AuditError(f"cross-fitting needs at least 2 folds, got {folds}")
    if len(shas) < folds:
        raise AuditError(f"{len(shas)} images cannot be dealt into {folds} folds (audit.folds)")
    order = np.argsort(np.asarray(shas, dtype=object), kind="stable")
    dealt = np.random.default_rng(seed).permutation(len(shas)) % folds
    fold = np.empty(len(shas), dtype=np.int64)
    fold[order] = dealt
    return fold


def linear_head(*, steps: int, lr: float, weight_decay: float) -> FitHead:
    """Multi-label logistic regression on standardised embeddings, full batch, loss only where a label is known."""

    def fit(features: np.ndarray, targets: np.ndarray, observed: np.ndarray) -> Predict:
        x = torch.from_numpy(np.asarray(features, np.float32))
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - mean) / std
        y = torch.from_numpy(np.asarray(targets, np.float32))
        mask = torch.from_numpy(np.asarray(observed, np.float32))
        prior = ((y * mask).sum(0) + 1) / (mask.sum(0) + 2)
        weight = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
        bias = torch.logit(prior).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x @ weight + bias, y, weight=mask, reduction="sum")
            loss = loss / mask.sum().clamp_min(1) + weight_decay * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
        weight, bias = weight.detach(), bias.detach()

        def predict(rows: np.ndarray) -> np.ndarray:
            z = (torch.from_numpy(np.asarray(rows, np.float32)) - mean) / std
            return torch.sigmoid(z @ weight + bias).numpy()

        return predict

    return fit


def cross_fit(
    features: np.ndarray, targets: np.ndarray, observed: np.ndarray, fold: np.ndarray, fit_head: FitHead
) -> np.ndarray:
    """Out-of-fold probabilities: each fold scored by a head fitted on every other fold, never on itself."""
    scores = np.full(targets.shape, np.nan, dtype=np.float32)
    for k in np.unique(fold):
        held_out = fold == k
        predict = fit_head(features[~held_out], targets[~held_out], observed[~held_out])
        scores[held_out] = predict(features[held_out])
    return scores


def out_of_fold_scores(
    features: np.ndarray, targets: np.ndarray, observed: np.ndarray, shas: Sequence[str], cfg: AuditConfig
) -> np.ndarray:
    """The audit's scores: the images dealt into `cfg.folds` folds, each scored by a linear head fitted on the rest."""
    fold = assign_folds(shas, cfg.folds, cfg.seed)
    head = linear_head(steps=cfg.head_steps, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    return cross_fit(features, targets, observed, fold, head)


# --- ranking -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suspect:
    image: int  # row of the audited frame
    label: int  # column of the class list
    kind: str  # missing | wrong
    score: float  # out-of-fold probability that the class is present
    rank: int  # 1 = most suspicious of its kind


def candidates(targets: np.ndarray, rankable: np.ndarray) -> dict[str, int]:
    """How many (image, class) pairs could be suspects of each kind."""
    return {MISSING: int(((targets == 0) & rankable).sum()), WRONG: int(((targets == 1) & rankable).sum())}


def rank_suspects(
    scores: np.ndarray, targets: np.ndarray, rankable: np.ndarray, limit: int | None = None
) -> dict[str, list[Suspect]]:
    """Suspected missing labels (labelled absent, highest score first) and wrong ones (labelled present, lowest
    score first), the first `limit` of each (None: all); ties by image row, then class column, so the order never
    depends on sort stability."""
    out: dict[str, list[Suspect]] = {}
    for kind, labelled, sign in ((MISSING, 0, -1.0), (WRONG, 1, 1.0)):
        rows, cols = np.nonzero((targets == labelled) & rankable)
        values = scores[rows, cols]
        order = np.lexsort((cols, rows, sign * values))[:limit]
        out[kind] = [
            Suspect(int(rows[i]), int(cols[i]), kind, float(values[i]), rank) for rank, i in enumerate(order, start=1)
        ]
    return out


# --- embeddings --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tower:
    """A frozen image tower and what identifies its embeddings in the cache."""

    encode: Callable[[torch.Tensor], torch.Tensor]  # normalised float NCHW -> embeddings
    image_norm: Any  # backbone.ImageNorm
    device: torch.device
    key: str  # digest of the weights and the architecture


def embed_images(
    tower: Tower,
    frame: pd.DataFrame,
    images_root: Path,
    preprocess_cache: Path,
    cache_dir: Path | None,
    batch_size: int,
) -> tuple[np.ndarray, int]:
    """L2-normalised embeddings of the frame's images, and how many were computed now (the rest came from the
    cache: `cache_dir/<tower key>/`, the images' hashes in `shas.txt`, one row each in `embeddings.npy`; None: no
    cache)."""
    from mumic_ml.data import CachedImageDataset, ImagePreparer
    from mumic_ml.images import PreprocessCache

    folder = None if cache_dir is None else Path(cache_dir) / tower.key
    known: dict[str, np.ndarray] = {}
    if folder is not None and (folder / "shas.txt").is_file() and (folder / "embeddings.npy").is_file():
        cached = np.load(folder / "embeddings.npy", allow_pickle=False)
        shas = (folder / "shas.txt").read_text(encoding="ascii").split()
        if len(shas) == len(cached):
            known = dict(zip(shas, cached))
    wanted = list(dict.fromkeys(frame["sha256"]))
    todo = frame.drop_duplicates("sha256")
    todo = todo[~todo["sha256"].isin(known.keys())]
    if len(todo):
        dataset = CachedImageDataset(
            todo,
            images_root,
            np.zeros((len(todo), 0), np.float32),
            PreprocessCache(preprocess_cache),
            tower.image_norm.size,
        )
        preparer = ImagePreparer(tower.image_norm, tower.device)
        rows = []
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
                rows.append(F.normalize(tower.encode(preparer(batch)).float(), dim=-1).cpu().numpy())
        known.update(zip(todo["sha256"], np.concatenate(rows)))
    if len(todo) and folder is not None:
        keep = sorted(known)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "embeddings.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.stack([known[sha] for sha in keep]), allow_pickle=False)
        atomic_write_text(folder / "shas.txt", "".join(f"{sha}\n" for sha in keep))
    matrix = np.stack([known[sha] for sha in wanted])
    index = {sha: i for i, sha in enumerate(wanted)}
    return matrix[[index[sha] for sha in frame["sha256"]]], len(todo)


# --- the audit ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditResult:
    rows: dict[str, list[dict[str, Any]]]  # the top of each kind as CSV rows (CSV_COLUMNS), most suspicious first
    candidates: dict[str, int]  # pairs that could be suspects, per kind
    n_images: int
    n_classes: int
    embedded_now: int
    csv_path: Path
    html_path: Path
    summary_path: Path
    seconds: float


def _label_sets(frame: pd.DataFrame, column: str) -> list[set[str]]:
    if column not in frame:
        return [set() for _ in range(len(frame))]
    return [set() if labels is None else set(labels) for labels in frame[column]]


def label_state(frame: pd.DataFrame, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets (labelled present), observed (not unknown: the head learns from it) and rankable (a suspect may be
    raised: neither unknown nor verified absent) as (images x classes) matrices."""
    present, negative, unknown = (_label_sets(frame, c) for c in ("labels", *QUALIFIED_LABEL_COLUMNS))
    targets = np.array([[name in labels for name in class_names] for labels in present], dtype=np.float32)
    targets = targets.reshape(len(frame), len(class_names))
    unknown_m = np.array([[name in u for name in class_names] for u in unknown], dtype=bool).reshape(targets.shape)
    negative_m = np.array([[name in n for name in class_names] for n in negative], dtype=bool).reshape(targets.shape)
    return targets, ~unknown_m, ~unknown_m & ~negative_m


def run_audit(
    frame: pd.DataFrame,
    class_names: Sequence[str],
    tower: Tower,
    cfg: AuditConfig,
    *,
    images_root: Path,
    preprocess_cache: Path,
    embedding_cache: Path,
    out_dir: Path,
) -> AuditResult:
    """Cross-fit, rank, and write `suspects.csv`, `report.html` and `audit.json` into `out_dir`."""
    started = time.monotonic()
    features, embedded_now = embed_images(tower, frame, images_root, preprocess_cache, embedding_cache, cfg.batch_size)
    targets, observed, rankable = label_state(frame, class_names)
    scores = out_of_fold_scores(features, targets, observed, list(frame["sha256"]), cfg)
    suspects = rank_suspects(scores, targets, rankable, limit=cfg.suspects)
    rows = {kind: [_csv_row(frame, class_names, s) for s in suspects[kind]] for kind in KINDS}
    counts = candidates(targets, rankable)
    out_dir = Path(out_dir)
    csv_path, html_path, summary_path = out_dir / "suspects.csv", out_dir / "report.html", out_dir / "audit.json"
    write_suspects_csv(csv_path, [row for kind in KINDS for row in rows[kind]])
    write_report_html(
        html_path,
        {kind: rows[kind][: cfg.report_rows] for kind in KINDS},
        frame,
        images_root,
        title=f"Label audit: {len(frame)} training images, {len(class_names)} classes, {cfg.folds}-fold",
    )
    seconds = time.monotonic() - started
    atomic_write_json(
        summary_path,
        {
            "images": len(frame),
            "classes": len(class_names),
            "folds": cfg.folds,
            "backbone": cfg.backbone.value,
            "tower": tower.key,
            "embedded_now": embedded_now,
            "candidates": counts,
            "listed": {kind: len(rows[kind]) for kind in KINDS},
            "seconds": round(seconds, 2),
        },
    )
    log.info("audit: %d images, %d embedded now, %.1f s", len(frame), embedded_now, seconds)
    return AuditResult(
        rows, counts, len(frame), len(class_names), embedded_now, csv_path, html_path, summary_path, seconds
    )


def _csv_row(frame: pd.DataFrame, class_names: Sequence[str], suspect: Suspect) -> dict[str, Any]:
    record = frame.iloc[suspect.image]
    source = record["source"]
    if "batch" in frame:
        source = f"{record['batch']}/{source}"
    return {
        "image": record["image_id"],
        "class": class_names[suspect.label],
        "kind": suspect.kind,
        "score": round(suspect.score, 4),
        "rank": suspect.rank,
        "source": source,
        "decision": "",
    }


def write_suspects_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


# --- the HTML report ---------------------------------------------------------------------------------------------


def _thumbnail_uri(path: Path) -> str | None:
    try:
        image = decode_image(path, max_pixels=DEFAULT_MAX_PIXELS, min_side=1, draft_side=THUMBNAIL_SIDE)
    except ImageRejected:
        return None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_SCRIPT = """
function reviewedCsv() {
  const cols = %s;
  const quote = v => /[",\\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;
  const lines = [cols.join(',')];
  document.querySelectorAll('tr[data-row]').forEach(tr => {
    const row = JSON.parse(tr.dataset.row);
    const picked = tr.querySelector('input[type=radio]:checked');
    row.decision = picked ? picked.value : '';
    lines.push(cols.map(c => quote(String(row[c]))).join(','));
  });
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([lines.join('\\n') + '\\n'], {type: 'text/csv'}));
  link.download = 'reviewed.csv';
  link.click();
}
"""


def write_report_html(
    path: Path, rows: dict[str, list[dict[str, Any]]], frame: pd.DataFrame, images_root: Path, *, title: str
) -> None:
    """One self-contained page: per kind, a table of suspects with the picture, the image's labels and an
    accept/reject choice; the button writes the choices into `reviewed.csv` for `mumic audit --apply`."""
    by_id = {record["image_id"]: record for record in frame.to_dict("records")}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{image-rendering:pixelated}",
        f"</style><script>{_SCRIPT % json.dumps(list(CSV_COLUMNS))}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Mark each suspect: <b>accept</b> if the audit is right (add the missing label, remove the wrong one), "
        "<b>reject</b> if the label as given is right. Both are recorded as verified; unmarked rows change nothing. "
        "Then <button onclick='reviewedCsv()'>download reviewed.csv</button> and run "
        "<code>mumic audit --apply reviewed.csv</code>.</p>",
    ]
    headings = {
        MISSING: "Suspected missing labels (labelled absent, scored high)",
        WRONG: "Suspected wrong labels (labelled present, scored low)",
    }
    for kind in KINDS:
        parts.append(f"<h2>{headings[kind]}: top {len(rows[kind])}</h2>")
        parts.append(
            "<table><tr><th>rank</th><th>image</th><th>class</th><th>score</th><th>labels now</th>"
            "<th>source</th><th>decision</th></tr>"
        )
        for n, row in enumerate(rows[kind]):
            record = by_id[row["image"]]
            uri = _thumbnail_uri(Path(images_root) / record["path"])
            picture = f"<img src='{uri}' alt='{html.escape(row['image'])}'>" if uri else "(cannot be decoded)"
            name = f"{kind}-{n}"
            radios = "".join(f"<label><input type='radio' name='{name}' value='{d}'> {d}</label> " for d in DECISIONS)
            labels = ", ".join(record["labels"])
            parts.append(
                f"<tr data-row='{html.escape(json.dumps(row), quote=True)}'><td>{row['rank']}</td>"
                f"<td>{picture}<br><code>{html.escape(row['image'])}</code></td>"
                f"<td><b>{html.escape(row['class'])}</b></td><td>{row['score']:.3f}</td>"
                f"<td>{html.escape(labels)}</td><td>{html.escape(str(row['source']))}</td><td>{radios}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")


# --- applying a review -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Correction:
    sha256: str
    path: Path  # the ingested image, linked into the correction batch
    labels: dict[str, list[str]]  # labels, negative_labels, unknown_labels: what the image's labels are now


@dataclass(frozen=True)
class ApplyOutcome:
    batch_dir: Path | None  # None: the review changes no label
    created: bool  # False: nothing to change, or the same batch was already written
    images: int  # images whose labels change
    decisions: int  # reviewed rows with a decision


def read_review(path: Path) -> list[dict[str, str]]:
    """Rows of a reviewed CSV that carry a decision, each with its line number; AuditError names every problem."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"reviewed list not found: {path}")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REVIEW_REQUIRED if c not in columns]
        if missing:
            raise AuditError(f"{path}: missing column(s) {missing}; a reviewed list needs {list(REVIEW_REQUIRED)}")
        reader.fieldnames = columns
        rows, problems = [], []
        for record in reader:
            line = reader.line_num
            decision = (record.get("decision") or "").strip().lower()
            kind = (record.get("kind") or "").strip().lower()
            if not decision:
                continue
            if decision not in DECISIONS:
                problems.append(f"line {line}: decision {record['decision']!r} is not one of {list(DECISIONS)}")
            elif kind not in KINDS:
                problems.append(f"line {line}: kind {record['kind']!r} is not one of {list(KINDS)}")
            else:
                rows.append(
                    {
                        "line": line,
                        "image": (record["image"] or "").strip(),
                        "class": (record["class"] or "").strip(),
                        "kind": kind,
                        "decision": decision,
                    }
                )
    if problems:
        raise AuditError(f"{path}: " + "; ".join(problems[:20]))
    return rows


def plan_corrections(
    review: list[dict[str, Any]], manifest: pd.DataFrame, taxonomy: Taxonomy, images_root: Path, source: str
) -> list[Correction]:
    """The new label columns of every image a review changes, in manifest order; AuditError on a row naming an
    unknown image or class, or two rows contradicting each other."""
    row_of: dict[str, int] = {}
    for i, (image_id, sha) in enumerate(zip(manifest["image_id"], manifest["sha256"])):
        row_of[image_id] = row_of[sha] = i
    problems: list[str] = []
    verdicts: dict[tuple[int, str], tuple[str, int]] = {}  # (image row, class) -> (present|absent, line)
    for item in review:
        i = row_of.get(item["image"])
        name = taxonomy.canonical(item["class"])
        if i is None:
            problems.append(f"line {item['line']}: image {item['image']!r} is not in the ingested manifest")
        if name is None:
            problems.append(f"line {item['line']}: class {item['class']!r} is not in the taxonomy")
        if i is None or name is None:
            continue
        present = (item["kind"] == MISSING) == (item["decision"] == ACCEPT)
        verdict = "present" if present else "absent"
        earlier = verdicts.setdefault((i, name), (verdict, item["line"]))
        if earlier[0] != verdict:
            problems.append(f"line {item['line']}: {name!r} on {item['image']!r} contradicts line {earlier[1]}")
    if problems:
        raise AuditError(f"{source}: " + "; ".join(problems[:20]))
    columns = ("labels", *QUALIFIED_LABEL_COLUMNS)
    corrections = []
    for i in sorted({i for i, _ in verdicts}):
        record = manifest.iloc[i]
        now = {c: list(record[c]) if c in manifest and record[c] is not None else [] for c in columns}
        new = {c: set(now[c]) for c in columns}
        for (row, name), (verdict, _) in verdicts.items():
            if row != i:
                continue
            for c in columns:
                new[c].discard(name)
            new["labels" if verdict == "present" else "negative_labels"].add(name)
        ordered = {c: sorted(new[c], key=taxonomy.index_of) for c in columns}
        if {c: sorted(now[c], key=taxonomy.index_of) for c in columns} != ordered:
            corrections.append(Correction(record["sha256"], Path(images_root) / record["path"], ordered))
    return corrections


def correction_manifest(corrections: Sequence[Correction]) -> str:
    """The CSV manifest of a correction batch: every row says "these are the image's labels now"."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "labels", *QUALIFIED_LABEL_COLUMNS, CORRECTION_COLUMN])
    for c in corrections:
        label_columns = [json.dumps(c.labels[k], ensure_ascii=False) for k in ("labels", *QUALIFIED_LABEL_COLUMNS)]
        writer.writerow([f"images/{c.sha256}.png", *label_columns, "true"])
    return buffer.getvalue()


def write_correction_batch(incoming: Path, corrections: Sequence[Correction]) -> tuple[Path, bool]:
    """`incoming/corrections-<hash of the manifest>/` with the images and the manifest; the same corrections give
    the same folder, so writing them twice is a no-op. Returns the folder and whether it was written now."""
    text = correction_manifest(corrections)
    batch = Path(incoming) / f"{CORRECTIONS_PREFIX}{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if (batch / "manifest.csv").is_file() and (batch / "manifest.csv").read_text(encoding="utf-8") == text:
        return batch, False
    with atomic_directory(batch) as staging:
        (staging / "images").mkdir()
        for c in corrections:
            target = staging / "images" / f"{c.sha256}.png"
            try:
                os.link(c.path, target)
            except OSError:
                shutil.copyfile(c.path, target)
        atomic_write_text(staging / "manifest.csv", text)
    return batch, True


def apply_review(
    reviewed: Path, *, manifest_path: Path, images_root: Path, incoming: Path, taxonomy: Taxonomy
) -> ApplyOutcome:
    """A reviewed list as a correction batch in `incoming`, ready for the next ingest."""
    review = read_review(reviewed)
    manifest = pd.read_parquet(manifest_path)
    corrections = plan_corrections(review, manifest, taxonomy, images_root, str(reviewed))
    if not corrections:
        return ApplyOutcome(None, False, 0, len(review))
    batch, created = write_correction_batch(incoming, corrections)
    return ApplyOutcome(batch, created, len(corrections), len(review))


def tower_from_backbone(backbone_name: str, weights: str | None, device: torch.device) -> Tower:
    """The image tower of open_clip weights (the foundation); None would embed with random weights, so it is refused."""
    from mumic_ml.backbone import create_backbone

    if weights is None:
        raise AuditError("audit.backbone 'foundation' needs model.pretrained: random weights embed nothing")
    backbone = create_backbone(backbone_name, weights, device=device)
    identity = file_digest(weights) if Path(weights).is_file() else weights
    key = "foundation-" + hashlib.sha256(f"{backbone_name}\n{identity}".encode()).hexdigest()[:16]
    return Tower(backbone.clip.eval().encode_image, backbone.image_norm, device, key)


def tower_from_model_dir(model_dir: Path, device: torch.device) -> Tower:
    """The image tower of a fine-tuned model directory."""
    from mumic_ml.model_io import load_model_dir

    loaded = load_model_dir(model_dir, device=device)
    key = "model-" + file_digest(Path(model_dir) / "model.safetensors")[:16]
    return Tower(loaded.classifier.clip.encode_image, loaded.image_norm, device, key)
