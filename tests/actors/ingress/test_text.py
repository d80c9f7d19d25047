"""TextCodec: prompt tokenization, chat templates (the checkpoint's, a named list, the default, rejection),
incremental detokenization that never splits a character, stop-string cutting."""

from __future__ import annotations

import json
import shutil

import pytest

from moemesh.actors.ingress.protocol import ChatMessage, OpenAIError
from moemesh.actors.ingress.text import DEFAULT_CHAT_TEMPLATE, StopCutter, TextCodec

TEXT = " Hello world! The expert mesh 😀 routes every token, ünïcödé and 中文 too."


@pytest.fixture(scope="module")
def codec(tiny_model_dir) -> TextCodec:
    return TextCodec.from_checkpoint(tiny_model_dir)


def with_tokenizer_config(tiny_model_dir, tmp_path, **cfg):
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return TextCodec.from_checkpoint(tmp_path)


def test_encode_decode(codec):
    ids = codec.encode(TEXT)
    assert ids[0] == 0 and codec.decode(ids) == TEXT  # the tiny tokenizer prepends <bos>; decode skips it
    assert codec.vocab_size == 512


def test_incremental_decoding_never_splits_a_character(codec):
    ids = codec.tokenizer.encode(TEXT, add_special_tokens=False).ids
    decoder = codec.decoder()
    pieces = [decoder.push([t]) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces) and "" in pieces  # multi-byte characters waited for their tokens


def test_flush_returns_a_partial_character(codec):
    ids = codec.tokenizer.encode("😀", add_special_tokens=False).ids
    assert len(ids) > 1
    decoder = codec.decoder()
    assert decoder.push(ids[:1]) == "" and decoder.flush() == "\ufffd"


def test_chat_templates(codec, tiny_model_dir, tmp_path):
    messages = [ChatMessage(role="system", content="S"), ChatMessage(role="user", content="U")]
    assert codec.render_chat(messages) == "<bos>S<｜User｜>U<｜Assistant｜>"  # the tiny checkpoint's template
    assert codec.encode_chat(messages) == codec.tokenizer.encode(codec.render_chat(messages),
                                                                 add_special_tokens=False).ids
    default = with_tokenizer_config(tiny_model_dir, tmp_path, bos_token={"content": "<bos>"}, eos_token="<eos>")
    assert default.chat_template == DEFAULT_CHAT_TEMPLATE
    assert default.render_chat(messages) == "<bos>system: S\nuser: U\nassistant:"
    assert default.encode_chat(messages)[0] == 0  # the template's <bos> is the special token, written once


def test_tiny_template_renders_tools_calls_and_results(codec):
    """The built-in chat format (kernels/chat_format.py): tools in the system part, an earlier assistant turn's calls
    as markup (arguments as a JSON string or an object), tool results wrapped, each marker one token."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [ChatMessage(role="system", content="S"), ChatMessage(role="user", content="U"),
                ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"a": 1}'}},
                    {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"b": 2}}}]}),
                ChatMessage(role="tool", content="sunny", tool_call_id="c1"),
                ChatMessage(role="assistant", content="It is sunny.")]
    text = codec.render_chat(messages, tools)
    assert text.startswith("<bos>S\n\n## Tools\n") and "### get_weather\nDescription: Weather of a city\n" in text
    assert 'Parameters: {"type": "object", "properties": {}}\n<｜User｜>U' in text
    assert text.endswith(
        "<｜User｜>U<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"a\": 1}"
        "<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"b\": 2}<｜tool▁call▁end｜>"
        "<｜tool▁calls▁end｜><eos><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜Assistant｜>It is sunny.<eos>"
        "<｜Assistant｜>")
    assert codec.render_chat(messages[:2]) == "<bos>S<｜User｜>U<｜Assistant｜>"  # no tools: no tools section
    vocab = codec.tokenizer.get_vocab(with_added_tokens=True)
    ids = codec.encode_chat(messages, tools)
    for marker in ("<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁output▁end｜>"):
        assert vocab[marker] in ids
    # role markers are skipped when decoding, tool markup decodes to its text (the ingress parses it)
    assert codec.decode([vocab["<｜Assistant｜>"], vocab["<｜tool▁sep｜>"]]) == "<｜tool▁sep｜>"


def test_tool_markup_survives_decoding_where_it_is_special(codec, tiny_model_dir, tmp_path):
    """A released checkpoint marks the tool-call tokens special; a decoder for a request with tools keeps their text
    (for the tool parser) and still hides the other special tokens."""
    tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    for entry in tok["added_tokens"]:
        entry["special"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    released = TextCodec.from_checkpoint(tmp_path)
    text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    ids = [0, *released.tokenizer.encode("<｜Assistant｜>" + text, add_special_tokens=False).ids, 1]  # bos, eos
    for c, expect_plain in ((codec, text), (released, "f{}")):
        plain, keep = c.decoder(), c.decoder(tool_markup=True)
        assert "".join(plain.push([t]) for t in ids) + plain.flush() == expect_plain
        assert "".join(keep.push([t]) for t in ids) + keep.flush() == text


def test_named_and_rejecting_templates(tiny_model_dir, tmp_path):
    strict = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
              "{{ m.content | tojson }}{% endfor %}")
    codec = with_tokenizer_config(tiny_model_dir, tmp_path, chat_template=[
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": strict}])
    assert codec.render_chat([ChatMessage(role="user", content="é")]) == '"é"'
    with pytest.raises(OpenAIError, match="no system role") as e:
        codec.render_chat([ChatMessage(role="system", content="x")])
    assert (e.value.status, e.value.param) == (400, "messages")


def test_template_sandbox(tiny_model_dir, tmp_path):
    codec = with_tokenizer_config(tiny_model_dir, tmp_path, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(OpenAIError):
        codec.render_chat([ChatMessage(role="user", content="x")])


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextCodec.from_checkpoint(tmp_path)


@pytest.mark.parametrize("pieces,stop,sent,text,stopped", [
    (["Hel", "lo wor", "ld"], ["world"], ["", "Hello", ""], "Hello ", True),  # 4 characters wait
    (["ab", "cd"], ["xyz"], ["", "ab"], "abcd", False),
    (["a STOP b"], ["STOP", "a S"], [""], "", True),  # the earliest match wins
    (["x", "y"], [], ["x", "y"], "xy", False),
])
def test_stop_cutter(pieces, stop, sent, text, stopped):
    cutter = StopCutter(stop)
    found, out = False, []
    for p in pieces:
        found = cutter.add(p)
        out.append(cutter.release())
        if found:
            break
    assert out == sent and found == stopped
    assert "".join(out) + cutter.release(final=True) == text
