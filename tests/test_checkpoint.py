"""Checkpoints: pickle-free, atomic, and complete or absent."""

import json

import pytest
import torch

from mumic_ml.checkpoint import (
    CheckpointError,
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
)


def _optimizer_state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_flatten_round_trip_keeps_types():
    state = {"a": torch.arange(3), "b": [1, 2.5, None, "x", (True, torch.ones(2))], "c": {"d": (0.9, 0.98)}}
    skeleton, tensors = flatten_state(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    back = unflatten_state(skeleton, tensors)
    assert torch.equal(back["a"], state["a"])
    assert back["b"][:4] == [1, 2.5, None, "x"]
    assert isinstance(back["b"][4], tuple) and torch.equal(back["b"][4][1], torch.ones(2))
    assert back["c"]["d"] == (0.9, 0.98)


def test_flatten_refuses_arbitrary_objects():
    with pytest.raises(TypeError, match="cannot store"):
        flatten_state({"x": object()})


def test_optimizer_state_survives_exactly(tmp_path):
    model, optimizer = _optimizer_state()
    path = save_checkpoint(
        tmp_path,
        global_step=7,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        state={"train_state": {"epoch": 1}},
    )
    assert latest_checkpoint(tmp_path) == path
    loaded = load_checkpoint(path)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    fresh.load_state_dict(loaded.optimizer_state)
    for key, value in optimizer.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(fresh.state_dict()["state"][key][name], tensor)
    assert loaded.state["train_state"] == {"epoch": 1}
    assert not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))


def test_old_checkpoints_are_pruned(tmp_path):
    model, optimizer = _optimizer_state()
    for step in range(1, 5):
        save_checkpoint(
            tmp_path,
            global_step=step,
            model_state=model.state_dict(),
            optimizer_state=optimizer.state_dict(),
            state={},
            keep=2,
        )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000000003", "step-000000004"]


def test_crash_while_writing_leaves_previous_checkpoint_current(tmp_path, monkeypatch):
    model, optimizer = _optimizer_state()
    good = save_checkpoint(
        tmp_path,
        global_step=1,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        state={"train_state": {"epoch": 1}},
    )

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mumic_ml.checkpoint.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(
            tmp_path, global_step=2, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(), state={}
        )
    assert latest_checkpoint(tmp_path) == good
    assert load_checkpoint(good).state["train_state"] == {"epoch": 1}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000001"]


def test_incomplete_or_foreign_checkpoints_are_refused(tmp_path):
    partial = tmp_path / "checkpoints" / "step-000000001"
    partial.mkdir(parents=True)
    (partial / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(partial)
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "step-000000009"}))
    with pytest.raises(CheckpointError, match="not on disk"):
        latest_checkpoint(tmp_path)


def test_a_planted_pickle_is_never_loaded(tmp_path):
    """A checkpoint directory whose weights file is a pickle (could run code) is rejected, not unpickled."""
    model, optimizer = _optimizer_state()
    path = save_checkpoint(
        tmp_path, global_step=1, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(), state={}
    )
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (path / "model.safetensors").write_bytes(pickle.dumps({"weight": Exploit()}))
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type for a non-safetensors file
        load_checkpoint(path)
    assert not marker.exists()
