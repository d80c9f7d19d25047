"""Generated tool-call markup (kernels/chat_format.py) -> OpenAI `tool_calls`, incrementally, on the text the
detokenizer releases (the markup tokens decode to their text; a model may also spell them with byte tokens, which
reads the same).

`ToolCallParser.feed(text, final)` returns the content to show and the stream deltas of the calls, as OpenAI streams
them: a call's first delta carries its index, id, type and name (with empty arguments), later ones argument
fragments. Text that could still become markup (a prefix of `<｜tool▁calls▁begin｜>`, a call whose name is not
complete) is held back until it is decided. Markup that does not follow the format (an unknown name, text where a
call should begin) stays content, from the point where it began; a call cut off by the end of the text (max_tokens)
keeps the arguments it got, as OpenAI does.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field

from moemesh.kernels.chat_format import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP

NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # a function name as OpenAI allows it (and dots)
_TEXT, _BETWEEN, _NAME, _ARGS = "text", "between", "name", "args"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""
    shown: bool = field(default=True, repr=False)  # False: a call past the limit (parallel_tool_calls false)

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolCallParser:
    """Splits one choice's text into content and tool calls. `tool_names`: the functions that may be called (a call
    to another name is not a call: it stays text); `max_calls`: calls past it are parsed and dropped (not shown,
    never content)."""

    def __init__(self, tool_names: Collection[str], max_calls: int | None = None):
        self.tool_names, self.max_calls = frozenset(tool_names), max_calls
        self.calls: list[ToolCall] = []
        self._state, self._buf = _TEXT, ""
        self._raw = ""  # markup consumed since the last committed point: content again if it turns out malformed

    @property
    def shown_calls(self) -> list[ToolCall]:
        return [c for c in self.calls if c.shown]

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """Take `text` (the next piece of the choice's text); -> (content that can be shown now, tool-call deltas).
        `final`: the text is complete: nothing is held back."""
        self._buf += text
        content, deltas = [], []
        while self._step(content, deltas, final):
            pass
        if final:
            if self._state == _ARGS:
                self._args(self._buf, deltas)
            else:
                content.append(self._raw + self._buf)
            self._buf, self._raw, self._state = "", "", _TEXT
        return "".join(content), _merge(deltas)

    def _step(self, content: list[str], deltas: list[dict], final: bool) -> bool:
        """Consume what the buffer decides; False when it must wait for more text."""
        buf = self._buf
        if self._state == _TEXT:
            i = buf.find(CALLS_BEGIN)
            if i < 0:
                keep = 0 if final else _partial_suffix(buf, CALLS_BEGIN)
                content.append(buf[:len(buf) - keep])
                self._buf = buf[len(buf) - keep:]
                return False
            content.append(buf[:i])
            self._buf = buf[i:]
            self._consume(len(CALLS_BEGIN), _BETWEEN)
            return True
        if self._state == _BETWEEN:
            for marker, state in ((CALL_BEGIN, _NAME), (CALLS_END, _TEXT)):
                if buf.startswith(marker):
                    self._consume(len(marker), state)
                    if state == _TEXT:
                        self._raw = ""
                    return True
            if any(m.startswith(buf) for m in (CALL_BEGIN, CALLS_END)):
                return False  # a marker may still come
            return self._malformed(content)
        if self._state == _NAME:
            i = buf.find(TOOL_SEP)
            if i < 0:
                if NAME.fullmatch(buf) or not buf or (len(buf) < 64 + len(TOOL_SEP) and _partial_suffix(buf, TOOL_SEP)):
                    return False
                return self._malformed(content)
            name = buf[:i]
            if not NAME.fullmatch(name) or name not in self.tool_names:
                return self._malformed(content)
            call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name,
                            shown=self.max_calls is None or len(self.shown_calls) < self.max_calls)
            self.calls.append(call)
            if call.shown:
                deltas.append({"index": len(self.shown_calls) - 1, "id": call.id, "type": "function",
                               "function": {"name": name, "arguments": ""}})
            self._buf, self._raw, self._state = buf[i + len(TOOL_SEP):], "", _ARGS
            return True
        i = buf.find(CALL_END)  # _ARGS
        if i < 0:
            keep = _partial_suffix(buf, CALL_END)
            self._args(buf[:len(buf) - keep], deltas)
            self._buf = buf[len(buf) - keep:]
            return False
        self._args(buf[:i], deltas)
        self._buf, self._state = buf[i + len(CALL_END):], _BETWEEN
        return True

    def _consume(self, n: int, state: str) -> None:
        self._raw += self._buf[:n]
        self._buf, self._state = self._buf[n:], state

    def _args(self, piece: str, deltas: list[dict]) -> None:
        call = self.calls[-1]
        call.arguments += piece
        if piece and call.shown:
            deltas.append({"index": len(self.shown_calls) - 1, "function": {"arguments": piece}})

    def _malformed(self, content: list[str]) -> bool:
        """Not markup after all: what was taken for it is content, and scanning goes on from there. Markup held since
        the last committed call goes out from its first character (so its marker is not found again); right after a
        call, the block just ends there."""
        held = self._raw + self._buf
        skip = 1 if self._raw else 0
        content.append(held[:skip])
        self._buf, self._raw, self._state = held[skip:], "", _TEXT
        return True


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker` (0 if none)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _merge(deltas: list[dict]) -> list[dict]:
    """Consecutive argument fragments of the same call joined into one delta (a call's first delta, with its name,
    stays apart, as OpenAI streams it)."""
    out: list[dict] = []
    for d in deltas:
        prev = out[-1] if out else None
        if prev is not None and prev["index"] == d["index"] and set(d) == set(prev) == {"index", "function"}:
            prev["function"] = {**prev["function"], "arguments": prev["function"]["arguments"] +
                                d["function"]["arguments"]}
        else:
            out.append(d)
    return out


def parse_tool_calls(text: str, tool_names: Collection[str], max_calls: int | None = None) -> tuple[str,
                                                                                                     list[ToolCall]]:
    """A whole text -> (its content, the calls shown): what a non-streamed answer carries."""
    parser = ToolCallParser(tool_names, max_calls)
    content, _ = parser.feed(text, final=True)
    return content, parser.shown_calls
