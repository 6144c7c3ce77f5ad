"""The objects of one answer, as the OpenAI API shapes them: chat or text completion, whole or streamed.

A :class:`Reply` knows the answer's id, its model and its prompt's size, and writes

* the whole response (``chat.completion`` / ``text_completion``) from the DoneEvent;
* the stream's chunks (``chat.completion.chunk`` / ``text_completion``): the opening chunk
  (chat: the assistant's role; text with ``echo``: the prompt's text), one chunk per text
  delta, the rest of the text, the chunk with ``finish_reason`` and, with
  ``stream_options.include_usage``, a last chunk without choices that carries the usage
  (every chunk before it has ``"usage": null``);
* logprobs, in the chat shape (``content: [{token, logprob, bytes, top_logprobs}]``) or the
  legacy completions shape (``tokens``, ``token_logprobs``, ``top_logprobs`` as a dict per
  token holding the n most likely and the chosen token, ``text_offset``).

Logprobs are the target's (see ``speculative/logprobs.py``); a token is named by its own text
(``Tokenizer.pieces``), so control tokens read as their strings and a piece of a
multi-byte character as U+FFFD (chat's ``bytes`` carry its real bytes). A streamed chunk
carries the logprobs of the tokens that arrived since the previous chunk, so a chunk's
text and its logprobs may differ by what was held back (a possible stop string, a partial
character); over the whole stream they add up to the same as the whole response.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .api_request import GenCall
from .runtime.decode import DoneEvent
from .speculative.logprobs import TokenLogprob

UNLIKELY = -9999.0  # what OpenAI reports for a log-probability too small to write (-inf)

Pieces = Callable[[list[int]], list[tuple[str, bytes]]]  # token ids -> (text, bytes) of each token


@dataclass
class Reply:
    """Fields shared by every object of one answer, and how they are shaped."""

    call: GenCall  # the checked request (kind, stream options, logprobs, echo)
    model: str  # the model id
    prompt_tokens: int  # tokens of the prompt (templated, for chat)
    pieces: Pieces  # names the tokens of logprobs
    echo: str = ""  # text completions with echo: the prompt's text, at the start of the answer
    id: str = ""  # the answer's id (made from the kind when empty)
    created: int = field(default_factory=lambda: int(time.time()))  # unix time
    _offset: int = 0  # legacy logprobs: text_offset of the next token

    def __post_init__(self) -> None:
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + os.urandom(12).hex()
        self._offset = len(self.echo)

    @property
    def chat(self) -> bool:
        return self.call.kind == "chat"

    def usage(self, completion: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    # ---------------------------------------------------------------- whole answer
    def response(self, done: DoneEvent, stats: dict[str, Any]) -> dict[str, Any]:
        """The whole answer as one object."""
        lps = self.logprobs(done.logprobs)
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": done.text},
                                      "logprobs": lps, "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": self.echo + done.text, "logprobs": lps,
                      "finish_reason": done.finish_reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(len(done.token_ids)), "system_fingerprint": None, "flowspec": stats}

    # ---------------------------------------------------------------- stream
    def chunk(self, text: str | None, finish: str | None = None, lps: Sequence[TokenLogprob] | None = None,
              **extra: Any) -> dict[str, Any]:
        """One stream chunk: `text` (None: the chat's closing delta, which is empty), the
        logprobs of the tokens it covers, `finish` on the last one."""
        logprobs = self.logprobs(lps) if lps else None
        if self.chat:
            delta = {} if text is None else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        out = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
               "created": self.created, "model": self.model, "system_fingerprint": None, "choices": [choice]}
        if self.call.include_usage:
            out["usage"] = None
        out.update(extra)
        return out

    def opening(self) -> list[dict[str, Any]]:
        """The chunks before the first token: the chat's role, or the echoed prompt."""
        if self.chat:
            first = self.chunk("")
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return [first]
        return [self.chunk(self.echo)] if self.echo else []

    def closing(self, done: DoneEvent, rest: str, lps: Sequence[TokenLogprob], stats: dict[str, Any]
                ) -> list[dict[str, Any]]:
        """The last chunks: the rest of the text (with the logprobs not sent yet), the
        finish_reason, and the usage when the request asked for it."""
        out = []
        if rest or lps:
            out.append(self.chunk(rest, lps=lps))
        out.append(self.chunk(None, done.finish_reason, flowspec=stats))
        if self.call.include_usage:
            out.append({"id": self.id, "object": out[-1]["object"], "created": self.created, "model": self.model,
                        "system_fingerprint": None, "choices": [], "usage": self.usage(len(done.token_ids))})
        return out

    # ---------------------------------------------------------------- logprobs
    def logprobs(self, lps: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        """Logprobs in the shape of this answer's kind; None when the request did not ask."""
        if self.call.logprobs is None or lps is None:
            return None
        ids = list(dict.fromkeys([e.token for e in lps] + [t for e in lps for t, _ in e.top]))
        named = dict(zip(ids, self.pieces(ids))) if ids else {}
        if self.chat:
            return chat_logprobs(lps, named)
        out, self._offset = legacy_logprobs(lps, named, self._offset)
        return out


def _lp(v: float) -> float:
    return v if math.isfinite(v) else UNLIKELY


def chat_logprobs(lps: Sequence[TokenLogprob], named: dict[int, tuple[str, bytes]]) -> dict[str, Any]:
    """The chat shape: one entry per token with its n most likely alternatives."""
    def item(tid: int, lp: float) -> dict[str, Any]:
        text, data = named[tid]
        return {"token": text, "logprob": _lp(lp), "bytes": list(data)}

    return {"content": [dict(item(e.token, e.logprob), top_logprobs=[item(t, v) for t, v in e.top]) for e in lps],
            "refusal": None}


def legacy_logprobs(lps: Sequence[TokenLogprob], named: dict[int, tuple[str, bytes]], offset: int
                    ) -> tuple[dict[str, Any], int]:
    """The completions shape, and the text offset after these tokens. ``top_logprobs`` maps
    the n most likely tokens' texts and the chosen token's to their logprobs (up to n + 1
    entries; two tokens with the same text share one key, the likelier one's)."""
    tokens, offsets, tops = [], [], []
    for e in lps:
        text = named[e.token][0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        top: dict[str, float] = {}
        for t, v in (*e.top, (e.token, e.logprob)):
            top.setdefault(named[t][0], _lp(v))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [_lp(e.logprob) for e in lps], "top_logprobs": tops,
            "text_offset": offsets}, offset
