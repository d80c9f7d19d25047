"""The `moemesh` command line: one subcommand per entry of `COMMANDS`.

To add a subcommand, write `_<name>_args(parser)` (its arguments) and `_<name>(args) -> int` (the work, returning the
exit status) and register both in `COMMANDS`. Errors a user can fix (ValueError, incl. config and checkpoint errors,
and OSError) print one line and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NamedTuple

EXIT_USAGE = 2


class Command(NamedTuple):
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- init-model ----------------------------------------------------------------------------------------------------
def _init_model_args(p: argparse.ArgumentParser) -> None:
    from moemesh.kernels.builtin import BUILTIN_MODELS
    from moemesh.kernels.synthetic import DTYPES

    p.add_argument("name", choices=list(BUILTIN_MODELS), help="built-in model to write: " + "; ".join(
        f"{m.name}: {m.summary}" for m in BUILTIN_MODELS.values()))
    p.add_argument("--out", required=True, help="directory to write the checkpoint into")
    p.add_argument("--dtype", choices=DTYPES, default="v4",
                   help="v4: FP8/FP4 weights as DeepSeek-V4 releases ship them (default); float32/bfloat16: "
                        "unquantized")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out directory")


def _init_model(args: argparse.Namespace) -> int:
    from moemesh.kernels.builtin import write_builtin_model

    out = write_builtin_model(args.name, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote the {args.name} model ({args.dtype}) to {out}")
    return 0


# ---- generate ------------------------------------------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, npu)")


def _generate(args: argparse.Namespace) -> int:
    """Offline generation with the single-process reference model."""
    import torch
    from tokenizers import Tokenizer

    import moemesh
    from moemesh.kernels.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = moemesh.load_model(args.checkpoint, dtype=getattr(torch, args.dtype), device=args.device)
    tokenizer = Tokenizer.from_file(f"{args.checkpoint}/tokenizer.json")
    prompt = tokenizer.encode(args.prompt).ids
    out = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, sampling=sampling)[0]
    new = out[len(prompt):].tolist()
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0


# ---- serve ---------------------------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="deployment config YAML (default: the built-in tiny model, one of each "
                                             "role, on http://127.0.0.1:8000)")
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto, or HOST:PORT; default: "
                                                   "$RAY_ADDRESS if set) instead of starting a new local one")
    p.add_argument("--host", default=None, help="override ingress.host")
    p.add_argument("--port", type=int, default=None, help="override ingress.port")
    p.add_argument("--detach", action="store_true", help="return once deployed (the app keeps running in Ray)")
    p.add_argument("--wait-for-resources", action="store_true",
                   help="deploy even if the cluster lacks the GPUs/NPUs the config asks for now (its autoscaler "
                        "adds them); by default that is an error")
    from moemesh.cluster.serve.stopping import DRAIN_S  # standard library only: cheap at parser time

    p.add_argument("--drain-timeout", type=float, default=DRAIN_S, metavar="SECONDS",
                   help=f"on Ctrl-C/SIGTERM, wait at most this long for in-flight requests before stopping "
                        f"(default {DRAIN_S:g}); a second Ctrl-C stops at once")


def _serve(args: argparse.Namespace) -> int:
    import os
    import signal

    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60 clients must say so before importing ray
    from moemesh.cluster.config import DeploymentConfig
    from moemesh.cluster.serve.stopping import ProcessTree, StopRequested, StopSignals, exit_now, stop_serving

    config = DeploymentConfig.from_yaml(args.config) if args.config else DeploymentConfig()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        config = config.model_copy(update={"ingress": config.ingress.model_copy(update=overrides)})
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    from moemesh.cluster.names import APP_NAME
    from moemesh.cluster.serve.app import deploy

    if args.detach:
        url = deploy(config, args.address, wait_for_resources=args.wait_for_resources)
        print(f"moemesh is serving {config.model} at {url} (OpenAI API)", flush=True)
        return 0
    # Before Ray starts anything: every process started from here on stays findable (and endable) at exit, and a
    # signal during start-up stops as cleanly as one while serving (cluster/serve/stopping.py).
    tree, signals = ProcessTree(), StopSignals().install()
    try:
        url = deploy(config, args.address, wait_for_resources=args.wait_for_resources)
        signals.install()  # ray.init replaced our SIGTERM handler with its own
        print(f"moemesh is serving {config.model} at {url} (OpenAI API); Ctrl-C stops it", flush=True)
        while True:
            _wait_for_a_signal()
    except StopRequested:
        pass
    except SystemExit:  # Ray's own SIGTERM handler (sys.exit), when the signal came while ray.init had it installed
        signals.signum = signals.signum or signal.SIGTERM
    except BaseException:  # start-up failed: stop what was started, then report as usual (main prints it)
        stop_serving(signals, tree, APP_NAME, args.drain_timeout)
        raise
    exit_now(stop_serving(signals, tree, APP_NAME, args.drain_timeout))
    return 1  # not reached: exit_now leaves the process


def _wait_for_a_signal() -> None:
    """Sleep until a signal arrives (the stop handlers raise)."""
    import signal
    import time

    if hasattr(signal, "pause"):
        signal.pause()
    else:  # Windows
        time.sleep(3600)


# ---- status --------------------------------------------------------------------------------------------------------
def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="the Ray cluster (HOST:PORT, or auto; default: $RAY_ADDRESS, else "
                                                   "auto: the cluster running on this machine)")
    p.add_argument("--app", default=None, help="the Serve application (default: moemesh)")
    p.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")


def _status(args: argparse.Namespace) -> int:
    """What runs and why: deployments and replicas, expert replicas, the hottest experts, decisions, pending nodes."""
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60 clients must say so before importing ray
    import ray

    from moemesh.cluster.names import APP_NAME
    from moemesh.cluster.status import as_json, collect, render

    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, namespace="moemesh-status", logging_level="ERROR", log_to_driver=False)
    except ConnectionError as e:
        raise ValueError(f"--address {address}: no Ray cluster there ({e})") from None
    try:
        status = collect(args.app or APP_NAME)
    finally:
        ray.shutdown()
    print(as_json(status) if args.json else render(status))
    return 0 if status["deployments"] else 1


# ---- bench ---------------------------------------------------------------------------------------------------------
def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["serve", "plan", "soak", "kernels", "prefix", "chunked"],
                   help="serve: served cluster vs in-process engine; plan: our planner vs the baselines on every "
                        "topology preset; soak: steady load for --minutes, RSS of every role at start and end; "
                        "kernels: each fast-path kernel vs the reference on --device; prefix: TTFT of a shared-prefix "
                        "multi-turn workload with the prefix cache on and off (in-process engine on --device); "
                        "chunked: running streams' TPOT while a --long-len prompt arrives, chunked prefill off and on "
                        "(in-process)")
    p.add_argument("--device", default="auto", help="kernels: cpu, cuda[:i], npu[:i] or auto (default)")
    p.add_argument("--preset", default="tiny", help="kernels: shapes (tiny or v4-flash; default tiny)")
    p.add_argument("--dtype", default="bfloat16", help="kernels: bfloat16 (default), float32 or float16")
    p.add_argument("--repeat", type=int, default=20, help="kernels: timed runs per op (median reported)")
    p.add_argument("--quick", action="store_true", help="plan: H200 and NVL72 at Zipf 0.6 only")
    p.add_argument("config", nargs="?", help="deployment config YAML (default: the built-in tiny model)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--model", default=None, help="serve: a built-in model name or a checkpoint directory (default: "
                                                 "the config's model)")
    p.add_argument("--micro-batches", default=None, help="serve: comma-separated micro-batch settings, each measured "
                                                         "on the same deployment (default: the config's)")
    p.add_argument("--json", default=None, help="serve: write every run's numbers to this JSON file")
    p.add_argument("--timeline", default=None, help="serve: draw a busy served step of the last run (an .svg or "
                                                    ".png path)")
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends (default 2)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per request (default 16)")
    p.add_argument("--conversations", type=int, default=4, help="prefix: conversations (default 4)")
    p.add_argument("--long-len", type=int, default=3000, help="chunked: tokens of the arriving prompt (default 3000)")
    p.add_argument("--turns", type=int, default=4, help="prefix: turns per conversation (default 4)")
    p.add_argument("--system-len", type=int, default=512, help="prefix: tokens of the shared system prompt "
                                                               "(default 512)")
    p.add_argument("--minutes", type=float, default=10.0, help="soak: minutes of steady load after warm-up "
                                                                "(default 10)")
    p.add_argument("--write", default=None, help="markdown file whose section to replace (e.g. docs/benchmarks.md)")


def _bench(args: argparse.Namespace) -> int:
    import os

    if args.what == "kernels":
        from moemesh.cluster.bench import kernels as bench_kernels
        from moemesh.cluster.bench.report import write_section

        return bench_kernels.main(["--device", args.device, "--preset", args.preset, "--dtype", args.dtype,
                                   "--repeat", str(args.repeat)] + (["--write", args.write] if args.write else []),
                                  write_section=write_section)
    if args.what == "prefix":
        from moemesh.cluster.bench import prefix as bench_prefix

        work = bench_prefix.Workload(conversations=_positive(args.conversations, "--conversations"),
                                     turns=_positive(args.turns, "--turns"),
                                     system_len=_positive(args.system_len, "--system-len"),
                                     max_tokens=_positive(args.max_tokens, "--max-tokens"))
        command = "moemesh " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("moemesh") else "moemesh bench prefix"
        print(bench_prefix.run(args.model or "tiny", work, args.device, args.write, command))
        return 0
    if args.what == "chunked":
        from moemesh.cluster.bench import chunked as bench_chunked

        command = "moemesh " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("moemesh") else "moemesh bench chunked"
        print(bench_chunked.run(args.model or "tiny", _positive(args.long_len, "--long-len"), args.write, command))
        return 0
    if args.what == "plan":
        from moemesh.cluster.bench import plan as bench_planner

        flags = (["--quick"] if args.quick else []) + (["--write", args.write] if args.write else [])
        return bench_planner.main(flags, command=" ".join(["moemesh bench plan", *flags]))
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from moemesh.cluster.bench.serve import run
    from moemesh.cluster.config import DeploymentConfig

    config = DeploymentConfig.from_yaml(args.config) if args.config else DeploymentConfig()
    if args.what == "soak":
        from moemesh.cluster.bench import soak as bench_soak

        if args.minutes <= 0:
            raise ValueError(f"--minutes: a positive number, got {args.minutes}")
        command = ("moemesh " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("moemesh")
                   else f"moemesh bench soak --minutes {args.minutes:g}")
        print(bench_soak.run(config, args.minutes, args.write, command))
        return 0
    levels = _positive_list(args.concurrency, "--concurrency")
    micro = _positive_list(args.micro_batches, "--micro-batches") if args.micro_batches else None
    command = "moemesh " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("moemesh") else "moemesh bench serve"
    print(run(config, levels, args.per_client, args.prompt_len, args.max_tokens, args.write, command,
              micro_batches=micro, json_path=args.json, model=args.model, timeline=args.timeline))
    return 0


def _positive_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(c) for c in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: comma-separated positive integers, got {text!r}")
    return values


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ValueError(f"{flag}: a positive integer, got {value}")
    return value


def _plan_command() -> Command:
    from moemesh.cluster.planner import report as plan_cli

    return Command(plan_cli.HELP, plan_cli.add_args, plan_cli.run)


COMMANDS: dict[str, Command] = {
    "plan": _plan_command(),
    "bench": Command("measure: `bench serve` (served cluster vs in-process engine), `bench plan` (planners)",
                     _bench_args, _bench),
    "serve": Command("serve a model over HTTP (OpenAI API) on a Ray cluster", _serve_args, _serve),
    "status": Command("show a running deployment: replicas, expert replicas, hot experts, decisions, pending nodes",
                      _status_args, _status),
    "generate": Command("generate text offline with the single-process reference model", _generate_args,
                        _generate),
    "init-model": Command("write a built-in model checkpoint (config, weights, tokenizer)", _init_model_args,
                          _init_model),
}


# ---- entry point ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moemesh", description="Serve DeepSeek-V4-class MoE models on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        cmd.add_args(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `moemesh ARGS`; returns the exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, OSError) as e:
        print(f"moemesh {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
