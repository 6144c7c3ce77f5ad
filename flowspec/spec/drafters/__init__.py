"""Drafters: where speculative tokens come from."""

from __future__ import annotations


from ...errors import ModelError
from .base import Drafter, DraftView, NoDrafter
from .lookup import LookupDrafter

DRAFTER_HELP = "none | lookup | model:PATH (a smaller LM with the same tokenizer) | eagle[:PATH]"


def parse_drafter(text: str) -> tuple[str, str | None]:
    kind, _, path = text.partition(":")
    if kind not in ("none", "lookup", "model", "eagle"):
        raise ModelError(f"unknown drafter {text!r}; use {DRAFTER_HELP}")
    if kind == "model" and not path:
        raise ModelError("drafter 'model' needs a path: model:PATH")
    return kind, path or None


def make_drafter(kind: str, path: str | None, target_vocab: int, dtype: str = "bfloat16",
                 max_context: int = 2048) -> Drafter:
    """Build the drafter a topology or a command line names."""
    if kind == "none":
        return NoDrafter()
    if kind == "lookup":
        return LookupDrafter()
    if kind == "model":
        from ...model.loader import resolve_model
        from .draft_model import DraftModelDrafter

        assert path is not None
        return DraftModelDrafter.load(resolve_model(path), dtype=dtype, max_context=max_context,
                                      target_vocab=target_vocab)
    if kind == "eagle":
        raise ModelError("the EAGLE-style head is not available yet; use drafter lookup or model:PATH")
    raise ModelError(f"unknown drafter {kind!r}; use {DRAFTER_HELP}")


__all__ = ["Drafter", "DraftView", "NoDrafter", "LookupDrafter", "make_drafter", "parse_drafter",
           "DRAFTER_HELP"]
