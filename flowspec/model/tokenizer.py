"""Tokenizer, chat template and stop tokens of a model folder (via transformers)."""

from __future__ import annotations

import json
import logging
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
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            raise ModelError(f"{folder}: could not load the tokenizer: {e}") from None
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

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation with the generation prompt appended."""
        if not self.has_chat_template:
            text = "\n".join(m["content"] for m in messages)
            return self.encode(text)
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.hf.encode(text, add_special_tokens=False)

    def encode_prompt(self, prompt: str, raw: bool = False) -> list[int]:
        """One user turn through the chat template, or the raw text when raw=True."""
        return self.encode(prompt) if raw else self.encode_chat([{"role": "user", "content": prompt}])

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)
