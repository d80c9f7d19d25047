"""The `moemesh` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

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
