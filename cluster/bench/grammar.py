"""What a request with a grammar costs the requests without one: the decode step of 8 plain requests against 7 plain
+ 1 constrained (a JSON schema), same engine and model, medians over many steps. Run:
`python -m moemesh.cluster.bench.grammar MODEL_DIR [--steps N] [--device cpu|cuda]`; prints JSON."""

from __future__ import annotations

import argparse
import json
import statistics
import time

from moemesh.actors.attention.engine import Engine
from moemesh.actors.attention.grammar import grammar_for
from moemesh.actors.request import RequestParams, StructuredOutput
from moemesh.kernels.model import load_model

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name", "n"]}}}, "required": ["items"]}


def step_ms(engine: Engine, constrained: int, batch: int, steps: int) -> float:
    """Median ms of a decode step with `batch` requests, `constrained` of them under SCHEMA (after prefill)."""
    spec = StructuredOutput(kind="json_schema", json_schema=json.dumps(SCHEMA))
    for i in range(batch):
        params = RequestParams(max_tokens=steps + 2, ignore_eos=i >= constrained,
                               structured=spec if i < constrained else None)
        engine.add_request(f"r{constrained}-{i}", [0, 10 + i, 20 + i], params)
    engine.step()  # prefill
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[:steps])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    model = load_model(args.model_dir, device=args.device)
    engine = Engine(model, grammar=grammar_for(args.model_dir, model.config))
    step_ms(engine, 1, args.batch, 10)  # warm-up (and the grammar compiled once, as a worker's cache holds it)
    out = {"device": args.device, "batch": args.batch, "steps": args.steps}
    for _ in range(2):  # alternate, so drift does not favour one
        for k in (0, 1):
            out.setdefault(f"{args.batch - k}_plain_{k}_constrained_ms", []).append(
                step_ms(engine, k, args.batch, args.steps))
    out = {k: min(v) if isinstance(v, list) else v for k, v in out.items()}
    out["overhead_pct"] = 100 * (out[f"{args.batch - 1}_plain_1_constrained_ms"] /
                                 out[f"{args.batch}_plain_0_constrained_ms"] - 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
