"""The overlap picture of docs/serving.md, drawn from a real step's recorded timeline (`RemoteStep.last_trace`).

One row per micro-batch on the attention worker's step thread (its compute: attention & co, router, shared expert),
one row per micro-batch for its routed tokens away at the expert shards, one for the Engram lookup; waits are hatched
on the step thread's rows. `moemesh bench serve --timeline FILE` takes a trace from the served run and writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

from moemesh.actors.attention.remote_step import Event
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")


def rows(events: Sequence[Event]) -> list[tuple[str, list[tuple[float, float]], str, str]]:
    """Events -> [(row label, [(start ms, width ms)], color, hatch)] from top to bottom."""
    mbs = sorted({mb for _, mb, *_ in events if mb >= 0})
    out = []
    for mb in mbs:
        color = COLORS[mb % len(COLORS)]
        spans = {kind: [(1e3 * s, 1e3 * (e - s)) for k, m, _, s, e in events if k == kind and m == mb]
                 for kind in ("compute", "wait_experts", "wait_engram", "experts")}
        out.append((f"step thread: micro-batch {mb} compute", spans["compute"], color, ""))
        out.append((f"step thread: micro-batch {mb} waits", spans["wait_experts"] + spans["wait_engram"], color,
                    "//"))
        out.append((f"micro-batch {mb} tokens at the expert shards", spans["experts"], color, ".."))
    engram = [(1e3 * s, 1e3 * (e - s)) for k, _, _, s, e in events if k == "engram"]
    if engram:
        out.append(("Engram lookup under way", engram, "#8172b3", ""))
    return out


def render(events: Sequence[Event], path: str, title: str) -> None:
    """Write the timeline as an image (the format follows `path`'s suffix: .svg, .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = rows(events)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(table) + 1.4))
    for y, (_, spans, color, hatch) in enumerate(reversed(table)):
        ax.broken_barh(spans, (y - 0.35, 0.7), facecolors=color if not hatch else "white", edgecolor=color,
                       hatch=hatch, linewidth=0.5)
    ax.set_yticks(range(len(table)), [label for label, *_ in reversed(table)], fontsize=8)
    ax.set_xlabel("ms since the step began")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None} if path.endswith(".svg") else None)
    plt.close(fig)
