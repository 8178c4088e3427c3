"""Text in and out of token ids for a model directory.

Owns the :class:`Tokenizer` wrapper (encode, decode, chat template rendering the way
transformers renders it) and the :class:`IncrementalDetokenizer` the frontend runs per
streamed chunk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dynamo_bus.errors import InvalidRequest, ModelUnavailable

REPLACEMENT = "\ufffd"
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                 "mask_token", "additional_special_tokens")


class Tokenizer:
    """A ``tokenizers`` tokenizer plus the model's chat template and special tokens."""

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}
        # Compiled once: rendering runs per chat request.
        self._template = _compile_template(chat_template) if chat_template else None
        self._pieces: dict[int, tuple[str, bytes]] = {}
        self._byte_level = _is_byte_level(backend)
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Load ``tokenizer.json`` and the chat template and special tokens from
        ``chat_template.jinja`` / ``tokenizer_config.json`` in the model directory ``path``."""
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            config_file = path / "tokenizer_config.json"
            config = json.loads(config_file.read_text("utf-8")) if config_file.is_file() else {}
        except Exception as exc:  # tokenizers raises bare Exception; json ValueError
            raise ModelUnavailable(f"Cannot load the tokenizer in {str(path)!r}: {exc}",
                                   param="model") from exc
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"  # where newer transformers save it
        if jinja_file.is_file():
            template = jinja_file.read_text("utf-8")
        special = {key: _content(config[key]) for key in _SPECIAL_KEYS
                   if config.get(key) is not None}
        return cls(backend, template, special)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text map to their ids."""
        # encode_batch releases the GIL (encode does not): tokenizing a long prompt in
        # a worker thread then leaves the event loop free to serve other requests. The
        # _fast variant skips the character offsets nobody here reads (~30 % less CPU).
        return self._encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; incomplete UTF-8 comes out as U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_piece(self, token_id: int) -> tuple[str, bytes]:
        """One token on its own, as OpenAI's logprobs show it: its text (special tokens
        included) and its bytes. A byte-level BPE token that is part of a multi-byte
        character has U+FFFD in its text and the raw bytes it stands for; other
        tokenizers give the UTF-8 of the text. An id outside the vocabulary is ``""``."""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._piece(token_id)
        return piece

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        if token_id in self._added:
            content = self._added[token_id]
            return content, content.encode()
        text = self.backend.decode([token_id], skip_special_tokens=False)
        if self._byte_level:
            symbols = self.backend.id_to_token(token_id)
            if symbols is not None and all(c in _BYTE_OF_SYMBOL for c in symbols):
                return text, bytes(_BYTE_OF_SYMBOL[c] for c in symbols)
        return text, text.encode()

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` to a prompt string as transformers' ``apply_chat_template``
        does (``tokenize=False``); extra keyword arguments reach the template."""
        if self._template is None:
            raise InvalidRequest("This model has no chat template; use /v1/completions.",
                                 param="messages")
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                tools=kwargs.pop("tools", None), documents=kwargs.pop("documents", None),
                **self.special_tokens, **kwargs)
        except jinja2.TemplateError as exc:
            # Templates raise_exception() on bad input such as roles out of order.
            raise InvalidRequest(f"Chat template rejected the messages: {exc}",
                                 param="messages") from exc


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation (plus
    :meth:`flush`) equals decoding all the ids at once, less incomplete bytes at the end.

    Decodes a short window of recent ids per push and hands out only text past what it
    already gave; trailing U+FFFD (a multi-byte character split across tokens) is held
    back until it completes. A few earlier ids stay in the window as context, because
    decoders such as sentencepiece's drop the leading space of a window's first token.

    The window starts with the tail of the prompt (``prompt``), as vLLM primes its
    decode stream with the prompt: a character whose first bytes end the prompt and whose
    last bytes start the output is the output's first character, not U+FFFD. Bytes that
    no token completes by the end are dropped (:meth:`flush`), as vLLM's OpenAI server
    drops them, in streams and whole responses alike.
    """

    _TRIM_AT = 16  # window length that triggers a trim; bounds the per-push decode cost
    _CONTEXT = 4  # ids kept as context after a trim
    _PROMPT_CONTEXT = 6  # prompt ids the window starts with (a character is <= 4 bytes)

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True,
                 prompt: Sequence[int] = ()) -> None:
        self._decode = tokenizer.backend.decode
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt[-self._PROMPT_CONTEXT:])
        # The prompt's own text is not ours to give out; its incomplete last character is.
        self._emitted = len(self._complete(self._decode(self._ids, skip_special_tokens=self._skip)))

    @staticmethod
    def _complete(text: str) -> str:
        """``text`` without the U+FFFD of bytes a later token may still complete."""
        return text.rstrip(REPLACEMENT) if text.endswith(REPLACEMENT) else text

    def push(self, token_ids: Sequence[int]) -> str:
        """Add ids; return the newly completed text (possibly empty)."""
        ids = self._ids
        ids.extend(token_ids)
        text = self._decode(ids, skip_special_tokens=self._skip)
        end = len(self._complete(text))
        out = text[self._emitted:end] if end > self._emitted else ""
        if end == len(text) and len(ids) > self._TRIM_AT:
            del ids[:-self._CONTEXT]
            # The kept ids may start mid-character; their text, U+FFFD included, is
            # already out, so count it as emitted.
            self._emitted = len(self._decode(ids, skip_special_tokens=self._skip))
        else:
            self._emitted = max(self._emitted, end)
        return out

    def flush(self) -> str:
        """End the stream: return what is held back, less bytes no token completed."""
        text = self._complete(self._decode(self._ids, skip_special_tokens=self._skip))
        out = text[self._emitted:]
        self._ids.clear()
        self._emitted = 0
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character that stands
    for it in a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_OF_SYMBOL = {c: b for b, c in _bytes_to_unicode().items()}


def _is_byte_level(backend: tokenizers.Tokenizer) -> bool:
    """Whether token strings are GPT-2 byte-level symbols (the decoder is ByteLevel)."""
    decoder = backend.decoder
    if decoder is None:
        return False
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # a decoder that cannot say what it is: assume nothing
        return False
    if state.get("type") == "Sequence" and len(state.get("decoders", [])) == 1:
        state = state["decoders"][0]
    return bool(state.get("type") == "ByteLevel")


def _content(value: Any) -> Any:
    """tokenizer_config stores a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_content(v) for v in value]
    return value


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}`` block marks assistant text for training masks;
    rendering only needs its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja reads this class attribute

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
            lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in: sandboxed, since templates
    come with downloaded models, and with the same globals and filters."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ModelUnavailable(f"The model's chat template does not compile: {exc}",
                               param="model") from exc
