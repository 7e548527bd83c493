"""The scale benchmark at a small size: every step runs and measures itself, and no step's cost per image grows
much from 1,000 to 2,000 images (the bound is loose: the machine is shared, and fixed costs weigh more at 1,000)."""

from __future__ import annotations

import json

import pytest

SIZES = (1000, 2000)


@pytest.mark.slow
def test_scale_benchmark_measures_every_step(load_benchmark, tmp_path):
    scale = load_benchmark("scale")
    scale.main(["--sizes", *map(str, SIZES), "--out", str(tmp_path)])
    results = json.loads((tmp_path / "scale.json").read_text())

    assert results["sizes"] == list(SIZES)
    assert set(results["steps"]) == set(scale.STEPS)
    for step, by_size in results["steps"].items():
        assert set(by_size) == {str(n) for n in SIZES}, step
        for n, figures in by_size.items():
            assert figures["images"] > 0, (step, n)
            for key in ("cpu_s", "wall_s", "peak_rss_mb", "cpu_s_per_1k", "wall_s_per_1k"):
                assert figures[key] > 0, (step, n, key, figures)
        assert by_size[str(SIZES[-1])]["cpu_ratio"] < 3, (step, by_size)
    assert by_size[str(SIZES[0])]["images"] < by_size[str(SIZES[-1])]["images"]
    for n, figures in results["ingest_workers"].items():
        assert figures["workers_0"]["images"] == figures["workers_2"]["images"] == int(n)
        assert figures["wall_speedup"] > 0
    for step in scale.MANIFEST_STEPS:
        assert step in results["memory_bytes_per_row"]
    assert "| ingest | 1,000 | 1,000 |" in scale.table(results)
