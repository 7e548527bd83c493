"""The served pyfunc under a short mixed load: bad requests get a clear answer and never cost a valid one."""

import json

import pytest


@pytest.mark.slow
def test_quick_load_keeps_valid_requests_working_and_answers_every_fault(tmp_path, load_benchmark):
    serve_load = load_benchmark("serve_load")
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
