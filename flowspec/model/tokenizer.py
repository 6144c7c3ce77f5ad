"""Tokenizer, chat template and stop tokens of a model folder (via transformers).

Message contents are always tokenized as **text**: a user who types ``<|im_end|>`` gets
the characters, never the control token, so nobody can inject a turn of another role.
Only the chat template's own markers become control tokens. Conversations without such
strings are tokenized exactly as ``transformers`` does (the whole rendered template at
once); a conversation whose contents contain a control-token string is tokenized piece
by piece (template text with control tokens, contents without).

Encoding and decoding go through the Rust tokenizer's batch calls, which release the
GIL, so a caller may run them in a worker thread without stalling an event loop.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .config import ModelConfig

log = logging.getLogger(__name__)


class Tokenizer:
    """A thin wrapper over a Hugging Face tokenizer that knows the model's stop tokens."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        try:
            from tokenizers import Tokenizer as RustTokenizer
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(folder))
            backend = self.hf.backend_tokenizer
        except Exception as e:
            raise ModelError(f"{folder}: could not load the tokenizer: {e}") from None
        self._rust = backend  # control-token strings become control tokens (template text)
        self._text = RustTokenizer.from_str(backend.to_str())  # control-token strings stay text
        self._text.encode_special_tokens = True
        self._specials = sorted({t.content for t in backend.get_added_tokens_decoder().values() if t.special},
                                key=len, reverse=True)
        # an upper bound of the characters one token stands for: longer texts cannot fit a context
        vocab = backend.get_vocab(with_added_tokens=True)
        self.max_token_chars: int = max((len(k) for k in vocab), default=1) + 1
        eos: set[int] = set(ModelConfig.from_file(str(folder / "config.json")).eos_token_ids)
        gen = folder / "generation_config.json"
        if gen.is_file():
            g = json.loads(gen.read_text()).get("eos_token_id")
            eos.update(g if isinstance(g, list) else ([g] if g is not None else []))
        if self.hf.eos_token_id is not None:
            eos.add(int(self.hf.eos_token_id))
        self.eos_ids: tuple[int, ...] = tuple(sorted(eos))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def has_control_text(self, text: str) -> bool:
        """Whether text contains the string of a control (special) token."""
        return any(s in text for s in self._specials)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation with the generation prompt appended; contents are text."""
        contents = [str(m["content"]) for m in messages]
        if not self.has_chat_template:  # the contents, one per line, with the tokenizer's additions (BOS)
            return list(self._text.encode_batch(["\n".join(contents)], add_special_tokens=True)[0].ids)
        if not any(self.has_control_text(c) for c in contents):
            text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return _ids(self._rust, text)
        pieces = self._template_pieces(messages)
        out: list[int] = []
        for text, is_content in pieces:
            if text:
                out.extend(_ids(self._text if is_content else self._rust, text))
        return out

    def _template_pieces(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_message_content) pieces, in order."""
        tag = secrets.token_hex(8)
        marks = [dict(m, content=f"\ue000{tag}:{i}\ue001") for i, m in enumerate(messages)]
        marked = self.hf.apply_chat_template(marks, add_generation_prompt=True, tokenize=False)
        real = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        parts = re.split("\ue000" + tag + r":(\d+)\ue001", marked)  # template, index, template, ...
        for transform in (lambda s: s, str.strip):  # templates that trim contents are common
            pieces: list[tuple[str, bool]] = []
            for k, p in enumerate(parts):
                pieces.append((p, False) if k % 2 == 0 else (transform(str(messages[int(p)]["content"])), True))
            if "".join(t for t, _ in pieces) == real:
                return pieces
        raise ModelError("this model's chat template changes message text, so a message that contains a "
                         "control-token string (such as " + ", ".join(repr(s) for s in self._specials[:2]) +
                         ") cannot be tokenized safely; remove those strings from the message")

    def encode_prompt(self, prompt: str, raw: bool = False) -> list[int]:
        """One user turn through the chat template, or the raw text when raw=True.

        A raw prompt is the caller's whole prompt: control-token strings in it are control
        tokens (that is how a hand-written template is sent)."""
        return self.encode(prompt) if raw else self.encode_chat([{"role": "user", "content": prompt}])

    def encode(self, text: str) -> list[int]:
        """Raw text with the tokenizer's own additions (BOS where it has one); control tokens parsed."""
        return list(self._rust.encode_batch([text], add_special_tokens=True)[0].ids)

    def encode_text(self, text: str) -> list[int]:
        """Text as text: no additions, control-token strings stay characters."""
        return _ids(self._text, text)

    def decode(self, ids: list[int]) -> str:
        return str(self._rust.decode_batch([list(ids)], skip_special_tokens=True)[0])

    def pieces(self, ids: list[int]) -> list[tuple[str, bytes]]:
        """Each token on its own: its text (a control token as its string; a piece of a
        multi-byte character as U+FFFD) and its bytes (byte-level BPE: the token's own bytes,
        which join into the characters; other tokenizers: the UTF-8 of its text). What
        logprobs name tokens by."""
        texts = self._rust.decode_batch([[i] for i in ids], skip_special_tokens=False)
        byte_level = type(self._rust.decoder).__name__ == "ByteLevel"
        out = []
        for i, text in zip(ids, texts):
            raw = self._rust.id_to_token(i) if byte_level and "\ufffd" in text else None
            data = bytes(_BYTE_OF[c] for c in raw) if raw and all(c in _BYTE_OF for c in raw) else text.encode()
            out.append((str(text), data))
        return out


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE writes byte b as the character b when it is printable Latin-1, and as
    chr(256 + k) for the k-th byte (counting up) that is not."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + k): b for k, b in enumerate(others)})
    return table


_BYTE_OF = _byte_alphabet()  # byte-level BPE character -> the byte it stands for (constant)


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok.encode_batch([text], add_special_tokens=False)[0].ids)
