"""The pure parts of `moemesh bench soak`: RSS from Prometheus text, target URLs, growth, the report (no Ray)."""

import math

from moemesh.cluster.bench.soak import (
    SoakResult,
    growth_pct,
    max_growth,
    metrics_urls,
    parse_rss,
    report,
)

EXPOSITION = """# HELP process_virtual_memory_bytes Virtual memory size in bytes.
# TYPE process_virtual_memory_bytes gauge
process_virtual_memory_bytes 4.123e+09
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 5.24288e+08
# HELP moemesh:num_requests_running Requests running.
moemesh:num_requests_running{model_name="tiny"} 3.0
"""


def test_parse_rss():
    assert parse_rss(EXPOSITION) == 524288000.0
    assert parse_rss('process_resident_memory_bytes{pid="7"} 1024\n') == 1024.0
    assert parse_rss("process_virtual_memory_bytes 1\n# process_resident_memory_bytes 5\n") is None
    assert parse_rss("") is None


def test_metrics_urls_unique_labels():
    targets = [{"targets": ["10.0.0.1:9001"], "labels": {"deployment": "expert-shard-0"}},
               {"targets": ["10.0.0.1:9002", "10.0.0.2:9002"], "labels": {"deployment": "engram"}},
               {"targets": ["10.0.0.3:9003"], "labels": {}}]
    assert metrics_urls(targets) == [("expert-shard-0", "http://10.0.0.1:9001/metrics"),
                                     ("engram", "http://10.0.0.1:9002/metrics"),
                                     ("engram#2", "http://10.0.0.2:9002/metrics"),
                                     ("?", "http://10.0.0.3:9003/metrics")]


def test_growth_and_report():
    assert growth_pct(100.0, 104.0) == 4.0
    assert growth_pct(200.0, 190.0) == -5.0
    assert math.isnan(growth_pct(0.0, 1.0))
    r = SoakResult({"ingress": 100 * 2**20, "w": 200 * 2**20, "gone": 1.0},
                   {"ingress": 103 * 2**20, "w": 198 * 2**20, "gone": None}, completed=10, failed=1, tokens=80,
                   wall_s=8.0)
    assert max_growth(r) == 3.0
    text = report(r, 2, "moemesh bench soak --minutes 2", 8, 16, 8, 20)
    assert text.startswith("## Soak (`moemesh bench soak`)\n")
    assert "| ingress | 100.0 | 103.0 | +3.00 |" in text
    assert "| w | 200.0 | 198.0 | -1.00 |" in text
    assert "| gone | 0.0 | n/a | n/a |" in text
    assert "10 completed, 1 failed (8 new tokens each" in text and "**2-minute** run" in text and ": met)" in text
