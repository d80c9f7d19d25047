"""Structured output on the attention worker: a request's `StructuredOutput` -> a grammar (xgrammar) whose token mask
the sampler applies to the step's logits as one batched op. Kinds: any JSON object, a JSON schema, and forced tool
calls (the chat format's call markup around arguments valid against each function's schema).

Why xgrammar (measured on the tiny model's tokenizer, one 48-token JSON answer to a 3-property schema, CPU;
docs/api.md "Structured output"): compile 3 ms and 18 us per token (mask + accept) against llguidance's 50 ms and
74 us and outlines-core's 55 ms (its per-token lookup is cheaper, 2 us, but it gives a token list rather than a
bitmask, and its regex-based JSON cannot express recursive schemas or an arbitrary JSON object). xgrammar is a
pushdown automaton (recursion, `$ref` cycles), fills a packed int32 bitmask per row and applies the masks of a batch
in one call (CUDA/Triton kernel on GPU), and vLLM and SGLang default to it.

`GrammarCompiler` is per worker: it holds the tokenizer's vocabulary once and caches compiled grammars keyed by the
`StructuredOutput` (plain, frozen data). `GrammarState` is per request: a matcher that catches up with the tokens
generated so far each time it fills its mask, so a moved request (whose earlier output arrives as prompt) and a
preempted one (recomputed) resume where they were.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch

from moemesh.actors.request import StructuredOutput
from moemesh.kernels.chat_format import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP

GRAMMAR_CACHE = 256  # compiled grammars kept per worker (least recently used go first)


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one vocabulary. `vocab_size`: the model's logits width (it may exceed the
    tokenizer's); `stop_token_ids`: what ends a finished grammar (the model's eos)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]):
        import xgrammar as xgr

        self._xgr = xgr
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # our own cache, keyed by the request value
        self.compile = lru_cache(maxsize=GRAMMAR_CACHE)(self._compile)

    @classmethod
    def from_checkpoint(cls, path: str | Path, vocab_size: int, stop_token_ids: Iterable[int]) -> GrammarCompiler:
        """From a checkpoint's tokenizer.json (+ tokenizer_config.json for its special tokens)."""
        from transformers import PreTrainedTokenizerFast

        path = Path(path)
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        special = {k: v.get("content") if isinstance(v, dict) else v for k, v in cfg.items()
                   if k in ("bos_token", "eos_token", "pad_token") and v}
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
        return cls(tok, vocab_size, stop_token_ids)

    def _compile(self, spec: StructuredOutput):
        """-> xgrammar's CompiledGrammar; ValueError (naming `response_format` or `tools`) if it does not compile."""
        try:
            return self._compiler.compile_grammar(self.grammar(spec))
        except (RuntimeError, ValueError) as e:
            param = "tools" if spec.kind == "tool_calls" else "response_format"
            raise ValueError(f"{param}: the grammar does not compile: {e}") from None

    def grammar(self, spec: StructuredOutput):
        """The uncompiled `xgrammar.Grammar` of `spec`."""
        Grammar = self._xgr.Grammar
        if spec.kind == "json_object":
            return Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "json_schema":
            return json_grammar(self._xgr, spec.json_schema or "{}")
        return tool_calls_grammar(self._xgr, spec)

    def state(self, spec: StructuredOutput) -> GrammarState:
        return GrammarState(self._xgr.GrammarMatcher(self.compile(spec)))


def grammar_for(model_dir: str | Path, cfg) -> GrammarCompiler | None:
    """The worker's compiler for a checkpoint (`cfg`: its ModelConfig), None when it has no tokenizer.json (then
    requests with structured output are refused with 400)."""
    if not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    eos = cfg.eos_token_id
    return GrammarCompiler.from_checkpoint(model_dir, cfg.vocab_size, [eos] if isinstance(eos, int) else eos or [])


_LOOSE_CHAR = r'[^\"\\\r\n]'  # xgrammar 0.2's character of a length-bounded string: lets control characters in
_JSON_CHAR = r'[^\0-\x1f\"\\\r\n]'  # what JSON allows unescaped (RFC 8259: no U+0000..U+001F)


def json_grammar(xgr, schema: str):
    """A JSON schema's grammar: compact JSON (no free whitespace, which a weak model can emit forever), properties
    the schema does not name are not generated (valid either way). Strings with minLength/maxLength get xgrammar's
    rule for a string character narrowed to what JSON allows unescaped (its own rule admits raw control
    characters there, which `json.loads` rejects)."""
    ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True))
    return xgr.Grammar.from_ebnf(ebnf.replace(_LOOSE_CHAR, _JSON_CHAR))


def tool_calls_grammar(xgr, spec: StructuredOutput):
    """Forced tool calls: the markup of kernels/chat_format.py around one call (or, with `spec.parallel`, one or
    more) of `spec.tools`, each call's arguments the `json_grammar` of that tool's parameters. Built as an xgrammar
    structural tag whose tags hold our JSON grammars (their rule names stay apart), so what follows `TOOL_SEP` is
    exactly what `response_format` would force for that schema."""
    tags = [{"type": "tag", "begin": CALL_BEGIN + tool.name + TOOL_SEP, "end": CALL_END,
             "content": {"type": "grammar", "grammar": str(json_grammar(xgr, tool.parameters))}}
            for tool in spec.tools]
    calls = {"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True,
             "stop_after_first": not spec.parallel}
    markup = {"type": "sequence", "elements": [{"type": "const_string", "value": CALLS_BEGIN}, calls,
                                               {"type": "const_string", "value": CALLS_END}]}
    return xgr.Grammar.from_structural_tag(json.dumps({"type": "structural_tag", "format": markup}))


class GrammarState:
    """One request's position in its grammar."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.consumed = 0  # output tokens accepted so far
        self.broken = False  # a token the grammar refused arrived (cannot happen under the mask): allow only stop

    def catch_up(self, output_ids: Sequence[int]) -> None:
        """Accept the tokens generated since the last call."""
        for t in output_ids[self.consumed:]:
            if not self.broken and not self.matcher.is_terminated() and not self.matcher.accept_token(int(t)):
                self.broken = True
        self.consumed = len(output_ids)


@torch.inference_mode()
def apply_grammars(logits: torch.Tensor, rows: Sequence[tuple[int, GrammarState, Sequence[int]]],
                   stop_ids: Sequence[int]) -> None:
    """logits [n, V] (in place): for each (row, state, output ids so far), every token the grammar does not allow
    next gets -inf. One bitmask [n, ceil(V / 32)] is filled on the CPU (the rows of constrained requests) and
    applied to those rows in one call; the other rows are not touched."""
    import xgrammar as xgr

    n, V = logits.shape
    bitmask = xgr.allocate_token_bitmask(n, V)  # int32 [n, ceil(V / 32)], all tokens allowed
    masked, done = [], []
    for i, state, output_ids in rows:
        state.catch_up(output_ids)
        if state.broken or state.matcher.is_terminated():
            done.append(i)
        else:
            state.matcher.fill_next_token_bitmask(bitmask, i)
            masked.append(i)
    if masked:
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), vocab_size=V,
                                        indices=masked)
    if done and stop_ids:  # only a stop token may follow (with none, e.g. ignore_eos, the row stays free)
        index, stops = torch.tensor(done, device=logits.device), torch.tensor(list(stop_ids), device=logits.device)
        keep = logits[index][:, stops]  # [d, s]
        logits[index] = -torch.inf
        logits[index[:, None], stops] = keep
