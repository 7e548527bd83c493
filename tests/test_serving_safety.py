"""A served model opens no server file unless given an image root, and no error message quotes a file's bytes.

The path policy is tested on `PathPolicy` and on `MumicPyfunc` with a stand-in predictor that decodes like the real
one; the slow tests start the README's servers (`make serve`, `make mlflow-ui`) without the venv on PATH.
"""

import base64
import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from repo_copy import REPO, clean_env, make_target, wait_for

from mumic_ml.images import DEFAULT_MAX_PIXELS, ImageRejected, _decode_failure, decode_image
from mumic_ml.pipeline import registry
from mumic_ml.pipeline.registry import IMAGE_ROOT_ENV, MumicPyfunc, PathPolicy
from mumic_ml.predict import Prediction

SERVING_ENV = ("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "__pyfunc_model_path__", IMAGE_ROOT_ENV)


@pytest.fixture
def layout(tmp_path):
    """An image root with a picture, a subfolder and links, next to a secret file outside it."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(root / "cat.png")
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("top secret\n")
    (root / "link_out").symlink_to(secret)
    (root / "link_in").symlink_to(root / "cat.png")
    return root, secret


def _refusal(policy: PathPolicy, path) -> str:
    with pytest.raises(ValueError) as info:
        policy.resolve(path)
    return str(info.value)


def test_a_served_model_without_an_image_root_opens_no_path(layout):
    root, secret = layout
    served = PathPolicy(image_root=None, served=True)
    for path in (root / "cat.png", secret, "/etc/passwd", "cat.png"):
        assert _refusal(served, path).startswith("path_input_disabled")


def test_in_process_the_caller_may_name_any_local_path(layout):
    root, secret = layout
    local = PathPolicy(image_root=None, served=False)
    assert local.resolve(secret) == str(secret)
    assert local.resolve("/etc/passwd") == "/etc/passwd"
    assert local.resolve("relative/to/cwd.png") == "relative/to/cwd.png"
    assert _refusal(local, "a\x00b.png").startswith("invalid_path")


@pytest.mark.parametrize("served", [True, False], ids=["served", "in_process"])
def test_paths_that_resolve_outside_the_image_root_are_refused_alike(layout, served):
    root, secret = layout
    policy = PathPolicy(os.path.realpath(root), served)
    escapes = [
        "/etc/passwd",
        secret,
        "link_out",
        root / "link_out",
        "../outside/secret.txt",
        "sub/../../outside/secret.txt",
        root / "sub" / ".." / ".." / "outside" / "secret.txt",
        "../outside/does-not-exist.txt",
        "/no/such/dir/file.png",
        root.parent / "photos-sibling" / "cat.png",  # shares the root's name as a prefix, not as a folder
    ]
    messages = {_refusal(policy, path) for path in escapes}
    assert len(messages) == 1, "the refusal must not depend on whether or where the file exists"
    (message,) = messages
    assert message.startswith("path_outside_image_root") and str(root) not in message


def test_paths_that_resolve_inside_the_image_root_are_read(layout):
    root, _ = layout
    policy = PathPolicy(os.path.realpath(root), served=True)
    cat = os.path.realpath(root / "cat.png")
    for path in ("cat.png", root / "cat.png", "sub/../cat.png", "link_in", "./sub/../link_in"):
        assert policy.resolve(path) == cat
    assert policy.resolve("sub/missing.png") == os.path.realpath(root / "sub" / "missing.png")


def test_the_image_root_is_resolved_before_paths_are_compared(layout, tmp_path, monkeypatch):
    root, secret = layout
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    for name in SERVING_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(IMAGE_ROOT_ENV, str(alias))
    policy = PathPolicy.from_environment()
    assert policy.image_root == os.path.realpath(root) and not policy.served
    assert policy.resolve(alias / "cat.png") == os.path.realpath(root / "cat.png")
    assert _refusal(policy, alias / "link_out").startswith("path_outside_image_root")


@pytest.mark.parametrize(
    ("env", "served"),
    [
        ({}, False),
        ({"_MLFLOW_IS_IN_SERVING_ENVIRONMENT": "true"}, True),
        ({"_MLFLOW_IS_IN_SERVING_ENVIRONMENT": "false"}, False),
        ({"__pyfunc_model_path__": "/models/m"}, True),  # set before the server loads the model
    ],
    ids=["in_process", "serving_flag", "serving_flag_false", "server_model_path"],
)
def test_serving_is_recognised_from_what_mlflow_sets(monkeypatch, env, served):
    for name in SERVING_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert PathPolicy.from_environment() == PathPolicy(None, served)


def test_the_serving_signals_are_the_ones_mlflow_sets(monkeypatch):
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server
    from mlflow.pyfunc.utils.environment import _simulate_serving_environment

    assert _MLFLOW_IS_IN_SERVING_ENVIRONMENT.name == registry._SERVING_FLAG_ENV
    assert scoring_server._SERVER_MODEL_PATH == registry._SERVER_MODEL_PATH_ENV
    for name in SERVING_ENV:
        monkeypatch.delenv(name, raising=False)
    with _simulate_serving_environment():  # how `log_model` checks the (base64) input example
        assert PathPolicy.from_environment().served


class _DecodingPredictor:
    """Stands in for `Predictor`: decodes each source the same way, so read errors are the real ones."""

    def predict(self, sources, *, top_k, threshold, extra_classes):
        predictions = []
        for source in sources:
            try:
                decode_image(source, max_pixels=DEFAULT_MAX_PIXELS, min_side=1)
            except ImageRejected as exc:
                predictions.append(Prediction("", [], [], f"{exc.reason}: {exc}"))
            else:
                predictions.append(Prediction("", ["cat"], [0.9]))
        return predictions


def _pyfunc() -> MumicPyfunc:
    model = MumicPyfunc()
    model.predictor = _DecodingPredictor()
    return model


@pytest.mark.parametrize("mode", ["served_with_root", "served", "in_process"])
def test_no_error_message_quotes_the_files_bytes(layout, monkeypatch, mode):
    root, secret = layout
    marker = uuid.uuid4().hex[:8]  # a whole marker fits in the first bytes any preview would show
    contents = {
        "text.jpg": f"{marker}\nmore text\n".encode(),
        "page.png": f"<!DOCTYPE html><html>{marker}</html>".encode(),
        "blob.jpg": marker.encode() + bytes(range(256)),
        "utf8.jpg": f"{marker} é".encode(),
    }
    for name, data in contents.items():
        (root / name).write_bytes(data)
    secret.write_text(f"{marker}\n")
    monkeypatch.chdir(root)  # in-process, a relative path is taken from the cwd
    for name in SERVING_ENV:
        monkeypatch.delenv(name, raising=False)
    if mode != "in_process":
        monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    if mode == "served_with_root":
        monkeypatch.setenv(IMAGE_ROOT_ENV, str(root))
    cells = [str(root / name) for name in contents] + [str(secret), str(root / "link_out"), "../outside/secret.txt"]
    cells += [{"b64": base64.b64encode(data).decode()} for data in contents.values()]
    cells += [(root / "cat.png").read_bytes()]

    out = _pyfunc().predict(None, pd.DataFrame({"image": cells}))

    errors = out["error"].tolist()
    assert errors[-1] is None and out["labels"].iloc[-1] == ["cat"]
    assert all(isinstance(error, str) and error for error in errors[:-1])
    assert not [error for error in errors if error and marker in error]
    reasons = [error.split(":", 1)[0] for error in errors[:-1]]
    n_files = len(contents)
    expected_for_paths = {
        "served_with_root": ["not_an_image"] * n_files + ["path_outside_image_root"] * 3,
        "served": ["path_input_disabled"] * (n_files + 3),
        "in_process": ["not_an_image"] * (n_files + 3),
    }[mode]
    assert reasons == expected_for_paths + ["not_an_image"] * n_files


def test_a_decoder_message_that_quotes_file_data_is_scrubbed():
    marker = uuid.uuid4().hex[:8]
    failures = [
        SyntaxError(f"broken PNG file (chunk b'{marker}')"),
        SyntaxError(f'not a TIFF file (header b"II*\\x00{marker}" not valid)'),
        KeyError(marker),
        ValueError(f"invalid literal for int() with base 10: '{marker}'"),
        OSError(f"image file is truncated (tag '{marker}')"),
        UnicodeDecodeError("utf-8", marker.encode() + b"\xff", 8, 9, "invalid start byte"),
    ]
    for exc in failures:
        rejected = _decode_failure("PNG", exc)
        assert marker not in str(rejected), exc
        assert rejected.reason in {"decode_error", "truncated"} and str(rejected)
    assert _decode_failure("JPEG", OSError(f"image file is truncated ('{marker}')")).reason == "truncated"


def test_a_file_that_is_no_image_is_described_by_kind_and_size(tmp_path):
    page = tmp_path / "download.jpg"
    page.write_bytes(b"<!DOCTYPE html><html><body>404</body></html>")
    with pytest.raises(ImageRejected) as info:
        decode_image(page, max_pixels=DEFAULT_MAX_PIXELS, min_side=1)
    assert info.value.reason == "not_an_image"
    assert "looks like an HTML page" in str(info.value) and f"{page.stat().st_size} bytes" in str(info.value)
    assert "DOCTYPE" not in str(info.value)


# --- the README's servers, started with make --------------------------------------------------------------------


def _group_processes(pgid: int) -> list[tuple[str, int]]:
    """(command line, resident kB) of every process in group `pgid`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.getpgid(int(proc.name)) != pgid:
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (proc / "status").read_text().splitlines()
            rss = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        except (OSError, ProcessLookupError):
            continue
        found.append((cmdline, rss))
    return found


@pytest.mark.slow
def test_make_serve_scores_image_bytes_and_opens_no_server_file(tmp_path, load_benchmark):
    serve_load = load_benchmark("serve_load")
    _, tracking_uri, images = serve_load.build_champion(tmp_path / "store", n_images=8)
    marker = uuid.uuid4().hex[:8]
    planted = tmp_path / "planted.txt"
    planted.write_text(f"{marker}\n")
    port = serve_load.free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"

    with make_target(REPO, "serve", port, clean_env({"MLFLOW_TRACKING_URI": tracking_uri}), log_path) as proc:
        wait_for(f"{url}/ping", proc, log_path)
        cells = [
            {"b64": base64.b64encode(images[0].read_bytes()).decode()},
            "/etc/passwd",
            str(images[0]),
            str(planted),
            {"b64": base64.b64encode(planted.read_bytes()).decode()},
        ]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}).encode()
        status, raw = serve_load.post(url, body)

    assert status == 200, raw[:500]
    rows = json.loads(raw)["predictions"]
    assert rows[0]["error"] is None and rows[0]["labels"]
    assert [row["error"].split(":", 1)[0] for row in rows[1:]] == ["path_input_disabled"] * 3 + ["not_an_image"]
    assert all(row["labels"] == [] for row in rows[1:])
    assert Path("/etc/passwd").read_bytes().splitlines()[0] not in raw and marker.encode() not in raw


@pytest.mark.slow
def test_make_mlflow_ui_answers_on_loopback_in_one_small_process_tree(tmp_path, load_benchmark):
    port = load_benchmark("serve_load").free_port()
    log_path = tmp_path / "ui.log"
    env = clean_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)

    with make_target(REPO, "mlflow-ui", port, env, log_path) as proc:
        wait_for(f"http://127.0.0.1:{port}/", proc, log_path)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            assert response.status == 200
        processes = _group_processes(proc.pid)

    pythons = [(cmd, rss) for cmd, rss in processes if "python" in cmd]
    assert not [cmd for cmd, _ in pythons if "mlflow.server.jobs" in cmd or "huey" in cmd], pythons
    assert len(pythons) <= 2, pythons  # the mlflow command and one uvicorn worker
    assert sum(rss for _, rss in pythons) < 1_500_000, pythons  # kB
