"""The MuMIC head on a real (tiny, random) open_clip model: text trimming, class pooling, zero-shot, save/load."""

import json
import math

import numpy as np
import pytest
import torch

from mumic_ml.backbone import BackboneError, create_backbone, resolve_pretrained
from mumic_ml.config import Head, ModelConfig
from mumic_ml.model import LinearClassifier, MumicClassifier, encode_text, tokenize_prompts
from mumic_ml.model_io import ModelDirError, build_classifier, load_model_dir, save_model_dir
from mumic_ml.taxonomy import Taxonomy

PROMPTS = [["a photo of a red circle.", "red circle"], ["a photo of a blue square."], ["a striped background."]]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("mumic-tiny", None)


def _images(n=3, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_trimmed_prompts_encode_like_the_full_context(backbone):
    clip, tokenizer = backbone.clip, backbone.tokenizer
    prompts = [p for group in PROMPTS for p in group]
    full = tokenizer(prompts)
    trimmed = tokenize_prompts(tokenizer, prompts, clip)
    assert trimmed.shape[1] < full.shape[1] // 4
    with torch.no_grad():
        reference = clip.encode_text(full)
        ours = encode_text(clip, trimmed)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_class_matrix_averages_normalised_prompt_embeddings(backbone):
    model = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS).eval()
    with torch.no_grad():
        w = model.class_features()
        first = torch.nn.functional.normalize(backbone.clip.encode_text(backbone.tokenizer(PROMPTS[0])), dim=-1)
    expected = torch.nn.functional.normalize(first.mean(0), dim=-1)
    assert w.shape == (3, backbone.model_config["embed_dim"])
    assert torch.allclose(w[0], expected, atol=1e-5)
    assert torch.allclose(w.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_logits_are_tempered_cosines(backbone):
    model = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS, init_temperature=0.05, init_bias=-2.0).eval()
    with torch.no_grad():
        out = model(_images())
    assert out.similarity.abs().max() <= 1.0 + 1e-5
    assert torch.allclose(out.logits, out.similarity / 0.05 - 2.0, atol=1e-4)
    assert out.temperature.item() == pytest.approx(0.05, rel=1e-5)


def test_temperature_is_learned_through_a_log_scale_and_clamped(backbone):
    model = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS, init_temperature=0.07)
    assert model.log_inv_temperature.requires_grad
    assert model.log_inv_temperature.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.log_inv_temperature.fill_(20.0)
    assert model.temperature.item() == pytest.approx(0.01, rel=1e-5)
    fixed = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS, learn_temperature=False)
    assert not fixed.log_inv_temperature.requires_grad
    from_clip = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS, init_temperature=None)
    assert from_clip.log_inv_temperature.item() == pytest.approx(backbone.clip.logit_scale.item())


def test_text_tower_gets_gradients_unless_frozen(backbone):
    model = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS).train()
    out = model(_images(2))
    out.logits.sum().backward()
    assert backbone.clip.token_embedding.weight.grad is not None
    assert backbone.clip.visual.conv1.weight.grad is not None
    backbone.clip.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    frozen_backbone = create_backbone("mumic-tiny", None)
    frozen = MumicClassifier(frozen_backbone.clip, frozen_backbone.tokenizer, PROMPTS, freeze_text=True).train()
    frozen(_images(2)).logits.sum().backward()
    assert frozen_backbone.clip.token_embedding.weight.grad is None
    assert frozen_backbone.clip.visual.conv1.weight.grad is not None


def test_extra_classes_are_scored_like_trained_ones(backbone):
    """Zero-shot: appending a class by name gives the same scores as if it had been in the class list."""
    both = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS).eval()
    first_two = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS[:2]).eval()
    images = _images()
    with torch.no_grad():
        extra = first_two.encode_class_prompts(PROMPTS[2:])
        appended = first_two(images, extra).logits
        reference = both(images).logits
    assert torch.allclose(appended, reference, atol=1e-4)


def test_linear_head_cannot_score_extra_classes(backbone):
    model = LinearClassifier(backbone.clip, 3, backbone.model_config["embed_dim"]).eval()
    with torch.no_grad():
        assert model(_images()).logits.shape == (3, 3)
        with pytest.raises(ValueError, match="zero-shot"):
            model(_images(), torch.zeros(1, backbone.model_config["embed_dim"]))


def test_class_residual_starts_at_zero_shot_and_moves_only_its_class(backbone):
    plain = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS).eval()
    model = MumicClassifier(backbone.clip, backbone.tokenizer, PROMPTS, class_residual=True).eval()
    images = _images()
    extra = plain.encode_class_prompts([["a green triangle."]])
    with torch.no_grad():
        assert torch.equal(model(images, extra).logits, plain(images, extra).logits)
        model.class_residual[1] += 0.3
        moved = model(images, extra).logits
        before = plain(images, extra).logits
    assert not torch.allclose(moved[:, 1], before[:, 1])
    assert torch.equal(moved[:, [0, 2, 3]], before[:, [0, 2, 3]])  # other classes and the zero-shot class unchanged
    assert model.class_residual.shape == (3, backbone.model_config["embed_dim"])
    assert model.class_residual.requires_grad and plain.class_residual is None


def _save(path, classifier, cfg, backbone, thresholds=None, metadata=None, **extra):
    taxonomy = Taxonomy.from_names(["red circle", "blue square", "striped background"])
    return save_model_dir(
        path,
        classifier=classifier,
        backbone_name="mumic-tiny",
        backbone_config=backbone.model_config,
        model_cfg=cfg,
        image_norm=backbone.image_norm,
        taxonomy=taxonomy,
        class_names=taxonomy.names,
        class_prompts=PROMPTS,
        thresholds=thresholds,
        metadata=metadata or {},
        **extra,
    )


def test_model_directory_from_before_the_class_residual_still_loads(tmp_path, backbone):
    cfg = ModelConfig(class_residual=False)
    model_dir = _save(tmp_path / "model", build_classifier(cfg, PROMPTS, backbone).eval(), cfg, backbone)
    spec = json.loads((model_dir / "model.json").read_text())
    del spec["model"]["class_residual"]
    (model_dir / "model.json").write_text(json.dumps(spec))
    assert load_model_dir(model_dir).classifier.class_residual is None


@pytest.mark.parametrize("head", [Head.MUMIC, Head.LINEAR])
def test_model_directory_round_trip(tmp_path, head):
    torch.manual_seed(0)
    backbone = create_backbone("mumic-tiny", None)
    cfg = ModelConfig(head=head, learn_bias=True, init_bias=-1.5)
    classifier = build_classifier(cfg, PROMPTS, backbone).eval()
    if head is Head.MUMIC:
        with torch.no_grad():
            classifier.class_residual.normal_(0, 0.1)
    _save(tmp_path / "model", classifier, cfg, backbone, np.array([0.5, np.inf, 0.2]), {"note": "test"})
    assert not list(tmp_path.glob(".*staging"))
    loaded = load_model_dir(tmp_path / "model")
    images = _images()
    with torch.no_grad():
        assert torch.equal(loaded.classifier(images).logits, classifier(images).logits)
    assert loaded.class_names == ["red circle", "blue square", "striped background"]
    assert loaded.thresholds[1] == np.inf
    assert loaded.metadata == {"note": "test"}
    assert loaded.supports_zero_shot == (head is Head.MUMIC)


def test_model_directory_errors(tmp_path):
    with pytest.raises(ModelDirError, match="not a MuMIC model directory"):
        load_model_dir(tmp_path)
    (tmp_path / "model.json").write_text('{"format": "something-else"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelDirError, match="unknown format"):
        load_model_dir(tmp_path)


def test_backbone_errors_are_specific(tmp_path):
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        resolve_pretrained("no-such-model", None)
    with pytest.raises(BackboneError, match="no pretrained tag 'nonsense'"):
        resolve_pretrained("ViT-B-32", "nonsense")
    with pytest.raises(BackboneError, match="checkpoint file not found"):
        resolve_pretrained("ViT-B-32", str(tmp_path / "missing.safetensors"))


def test_offline_pretrained_tag_fails_with_instructions():
    """Real weights are the real path; offline it must say what is missing and how to provide it."""
    with pytest.raises(BackboneError, match="set model.pretrained to its local path"):
        create_backbone("ViT-B-32", "openai")


def test_local_checkpoint_file_loads_like_pretrained_weights(tmp_path, backbone):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.clip.state_dict().items()}, path)
    again = create_backbone("mumic-tiny", str(path))
    for key, value in backbone.clip.state_dict().items():
        assert torch.equal(again.clip.state_dict()[key], value)
