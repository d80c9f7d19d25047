"""The `moemesh` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from tokenizers import Tokenizer

import moemesh


def _moemesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh.cluster.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_prints_the_prompt_and_the_greedy_continuation(tiny_model_dir):
    done = _moemesh("generate", str(tiny_model_dir), "--prompt", "The expert shard", "--max-new-tokens", "12")
    assert done.returncode == 0, done.stderr
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    prompt = tokenizer.encode("The expert shard").ids
    out = moemesh.load_model(tiny_model_dir).generate(torch.tensor([prompt]), max_new_tokens=12)[0]
    expected = "The expert shard" + tokenizer.decode(out[len(prompt):].tolist(), skip_special_tokens=True)
    assert done.stdout.rstrip("\n") == expected


def test_bad_arguments_exit_2_with_one_line(tiny_model_dir, tmp_path):
    done = _moemesh("generate", str(tiny_model_dir), "--prompt", "x", "--top-p", "0")
    assert done.returncode == 2 and "top_p" in done.stderr and "Traceback" not in done.stderr
    done = _moemesh("generate", str(tmp_path), "--prompt", "x")
    assert done.returncode == 2 and "config.json" in done.stderr and "Traceback" not in done.stderr


def test_serve_asking_for_gpus_or_npus_fails_clearly_where_there_are_none(tiny_model_dir, tmp_path):
    """This machine has no GPU or NPU: `moemesh serve` refuses before starting any Ray, naming what is missing."""
    import yaml

    for name, placement, needs in (("gpu", {"num_gpus": 1, "device": "cuda"}, "4 GPU"),
                                   ("npu", {"resources": {"NPU": 1}, "device": "npu"}, "4 NPU")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "attention": {"replicas": 2,
                                        "placement": placement}, "experts": {"shards": 2, "placement": placement}}))
        done = _moemesh("serve", str(path), "--port", "0")
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"the config requests {needs} but the cluster has 0" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "Started a local Ray instance" not in done.stderr + done.stdout


def test_bench_kernels_reports_the_reference_path_on_the_cpu():
    done = _moemesh("bench", "kernels", "--device", "cpu", "--dtype", "float32", "--repeat", "2")
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "reference" in line]
    assert {r.split("|")[1].strip() for r in rows} >= {"rms_norm", "routed_experts", "sink_attention", "engram_gate"}


def test_status_shows_the_served_deployments_and_where_they_run(served, ray_cluster):
    """`moemesh status` against the session's cluster (the served tiny app, no expert controller): every deployment
    RUNNING with its replica, on the node type the config pins it to; text and JSON."""
    cluster, _ = ray_cluster
    done = _moemesh("status", "--address", cluster.address, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    status = json.loads(done.stdout)
    deployments = status["deployments"]
    assert status["app_status"] == "RUNNING" and status["controller"] is None
    assert {"ingress", "attention-worker-0", "attention-worker-1", "expert-shard-0", "expert-shard-2",
            "engram-shard-0-0"} <= set(deployments)
    assert all(d["status"] == "HEALTHY" and d["replicas"] == {"RUNNING": 1} for d in deployments.values()), deployments
    assert deployments["expert-shard-0"]["nodes"] == ["expert"] and deployments["engram-shard-0-0"]["nodes"] == \
        ["engram"] and deployments["attention-worker-0"]["nodes"] == ["head"]
    text = _moemesh("status", "--address", cluster.address)
    assert text.returncode == 0 and "application moemesh: RUNNING" in text.stdout
    assert "expert-shard-1" in text.stdout and "expert controller: none" in text.stdout
    missing = _moemesh("status", "--address", cluster.address, "--app", "no-such-app")
    assert missing.returncode == 1 and "no application 'no-such-app'" in missing.stdout
