"""The served pyfunc under a short mixed load: bad requests get a clear answer and never cost a valid one."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def _load_script():
    """benchmarks/ is not a package: load the script as a module to call its main in-process."""
    spec = importlib.util.spec_from_file_location("serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_load_keeps_valid_requests_working_and_answers_every_fault(tmp_path):
    serve_load = _load_script()
    out = tmp_path / "report" / "serve_load.json"
    argv = ["--quick", "--duration", "3", "--workers", "2", "--images", "8", "--workdir", str(tmp_path / "work")]
    assert serve_load.main([*argv, "--out", str(out)]) == 0

    figures = json.loads(out.read_text())
    assert figures["ok"] and figures["checks"]["server_alive"]
    assert figures["valid"]["ok"] > 0 and figures["valid"]["failed"] == 0
    assert figures["valid"]["latency_ms"]["p50"] > 0
    for kind in serve_load.FAULT_KINDS:
        row = figures["kinds"][kind]
        assert row["sent"] >= 1, kind
        assert row["as_expected"] == row["sent"], (kind, row)
        assert row["example_message"].strip(), kind
        codes = {int(code) for code in row["status_codes"]}
        assert codes <= ({200} if row["expected"] == "row_error" else set(range(400, 500))), (kind, codes)
    assert figures["checks"]["stack_traces_leaked"] == 0
