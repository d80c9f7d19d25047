"""Benchmark results in docs/benchmarks.md: each benchmark owns one `## ` section and rewrites only it."""

from __future__ import annotations


def write_section(path: str, text: str) -> None:
    """Replace this benchmark's section of a markdown file (from its `## ` heading to the next), or append it."""
    from pathlib import Path

    doc = Path(path)
    heading = text.splitlines()[0]
    old = doc.read_text() if doc.exists() else "# Benchmarks\n\nEvery figure below was measured by the command shown " \
                                               "with it, on the machine named.\n"
    if heading in old:
        before, rest = old.split(heading, 1)
        after = rest.split("\n## ", 1)
        old = before + text + ("\n## " + after[1] if len(after) > 1 else "")
        doc.write_text(old)
    else:
        doc.write_text(old.rstrip("\n") + "\n\n" + text)
