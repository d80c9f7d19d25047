"""Text <-> tokens for serving: prompt tokenization, chat templating, incremental detokenization, stop strings.

`TextCodec` wraps a `tokenizers.Tokenizer` loaded from a checkpoint's tokenizer.json. Chat prompts are rendered with
the checkpoint's `chat_template` (tokenizer_config.json, Jinja in a sandbox, the variables transformers passes) or,
when there is none (the built-in tiny model), with `DEFAULT_CHAT_TEMPLATE`, then tokenized without adding special
tokens (the template writes them). Completion prompts are tokenized with the tokenizer's own special tokens
(`moemesh generate` does the same).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders

from moemesh.actors.ingress.protocol import ChatMessage, bad_request
from moemesh.kernels.chat_format import TOOL_TOKENS

# `{bos}` then one "role: content" line per message, then "assistant:" for the model to continue.
DEFAULT_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")


class TextCodec:
    """Prompt tokenization, chat templating and detokenization for one model."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self._template = _compile(self.chat_template)
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._pieces: dict[int, tuple[str, list[int]]] = {}
        added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        # special tokens but the tool-call markup: what a decoder that keeps the markup still hides
        self._hidden = frozenset(i for i, t in added.items() if t.special and t.content not in TOOL_TOKENS)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> TextCodec:
        """tokenizer.json (required) and tokenizer_config.json (optional: chat_template, bos_token, eos_token)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (the ingress needs one to tokenize prompts)")
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        return cls(Tokenizer.from_file(str(path / "tokenizer.json")), _template_of(cfg),
                   _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """A completion prompt, with the tokenizer's special tokens (e.g. a leading BOS)."""
        return self.tokenizer.encode(text).ids

    def render_chat(self, messages: Sequence[ChatMessage], tools: list[dict] | None = None) -> str:
        """The prompt text of a conversation, ending with the assistant's turn; `tools` (OpenAI tool objects) as
        transformers passes them. Raises `OpenAIError` 400 when the template rejects the conversation (templates
        call `raise_exception`, e.g. for non-alternating roles)."""
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=[m.model_dump() for m in messages], add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token, tools=tools or None)
        except TemplateError as e:
            raise bad_request(f"messages: the chat template rejected the conversation: {e}", "messages") from None

    def encode_chat(self, messages: Sequence[ChatMessage], tools: list[dict] | None = None) -> list[int]:
        return self.tokenizer.encode(self.render_chat(messages, tools), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decoder(self, tool_markup: bool = False) -> IncrementalDecoder:
        """`tool_markup`: keep the tool-call tokens' text even where the tokenizer marks them special (a released
        checkpoint does; the built-in models' decode as text anyway), so the tool parser can read them; other
        special tokens stay hidden."""
        return IncrementalDecoder(self.tokenizer, self._hidden if tool_markup else None)

    def token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """One token alone, as logprobs show it: its text (special tokens included; a partial UTF-8 character shows
        as U+FFFD, as in vLLM) and its raw bytes (for a byte-level BPE the bytes it stands for, so partial characters
        can be joined; else its text's UTF-8)."""
        piece = self._pieces.get(token_id)
        if piece is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = self.tokenizer.id_to_token(token_id) or ""
            if self._byte_level and raw and all(c in _BYTE_OF for c in raw):
                piece = (text, [_BYTE_OF[c] for c in raw])
            else:
                piece = (text, list(text.encode("utf-8")))
            self._pieces[token_id] = piece
        return piece


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet, inverted: the 188 printable Latin-1 bytes stand for themselves, the other 68 bytes
    (controls, space, ...) for chr(256 + i), i counting them in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_OF = _byte_alphabet()


def _template_of(cfg: dict) -> str | None:
    """transformers stores one template, or a list of named ones (we use "default")."""
    template = cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_text(token) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token


def _compile(source: str):
    """A template compiled as transformers does (sandboxed; trim_blocks, lstrip_blocks; tojson, raise_exception)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # jinja2 comes with torch; say so if a stripped install lacks it
        raise ImportError("chat templates need jinja2 (pip install jinja2)") from e

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class IncrementalDecoder:
    """Token ids -> text deltas, never splitting a character: byte-level BPE spreads one UTF-8 character over several
    tokens, and decoding a window alone can drop a leading space, so each delta is the difference between decoding
    a short window with and without the new tokens (vLLM's approach)."""

    def __init__(self, tokenizer: Tokenizer, hidden: frozenset[int] | None = None):
        self._tokenizer, self._hidden = tokenizer, hidden  # hidden: ids dropped instead of all special tokens
        self._ids: list[int] = []
        self._prefix = self._read = 0  # window start; end of what was already turned into text

    def push(self, ids: Sequence[int]) -> str:
        """The text the new ids complete ("" while a character is still partial)."""
        self._ids += ids
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back (at the end of the sequence, even a partial character)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def _decode(self, ids: list[int]) -> str:
        if self._hidden is not None:
            return self._tokenizer.decode([i for i in ids if i not in self._hidden], skip_special_tokens=False)
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class StopCutter:
    """Accumulates a choice's text, cuts it before the first stop string, and releases text only once it cannot be
    the start of a stop string (the last `longest stop - 1` characters wait)."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.text = ""
        self._sent = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, piece: str) -> bool:
        """Append `piece`; True when a stop string appeared (the text now ends right before it)."""
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def release(self, final: bool = False) -> str:
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        out, self._sent = self.text[self._sent:end], end
        return out
