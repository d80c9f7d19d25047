"""`moemesh bench kernels` on the CPU: runs the reference of every op, names the device, invents no fast-path row."""

from __future__ import annotations

import pytest

from moemesh.cluster.bench import kernels as bench_kernels


def test_cpu_run_reports_reference_only(capsys):
    written = {}
    argv = ["--device", "cpu", "--dtype", "float32", "--repeat", "1", "--write", "bench.md"]
    assert bench_kernels.main(argv, write_section=written.__setitem__) == 0
    text = written["bench.md"]
    assert text.startswith("## Kernels: cpu, float32, preset tiny\n") and text.strip() in capsys.readouterr().out
    assert "device: cpu (cpu), kernels: reference" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| op")]
    assert {r.split(" | ")[0][2:] for r in rows} == {"rms_norm", "routed_experts", "sink_attention", "engram_gate"}
    for row in rows:
        cells = row.strip("|").split(" | ")
        assert cells[2] == "reference" and cells[3] == "-" and float(cells[4]) > 0  # no fast time on a CPU


def test_write_needs_the_cli_writer(capsys):
    with pytest.raises(SystemExit):
        bench_kernels.main(["--device", "cpu", "--write", "x.md"])
    assert "moemesh bench kernels" in capsys.readouterr().err


def test_missing_device_is_a_clear_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(bench_kernels.devices, "torch_npu_installed", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        bench_kernels.main(["--device", "npu"])
    assert exit_.value.code == 2 and "torch_npu is not installed" in capsys.readouterr().err
