"""Drafters: where speculative tokens come from."""

from __future__ import annotations

from pathlib import Path

from ...errors import ModelError
from ..bounds import FieldError
from ..params import split_drafter
from .base import Drafter, DraftView, NoDrafter
from .lookup import LookupDrafter

DRAFTER_HELP = "none | lookup | model:PATH (a smaller LM with the same tokenizer) | eagle[:PATH]"


def parse_drafter(text: str) -> tuple[str, str | None]:
    """(kind, path) of a drafter as written (the syntax is :func:`~flowspec.speculative.params.split_drafter`'s);
    ModelError when it names none."""
    try:
        return split_drafter(text)
    except FieldError as e:
        raise ModelError(f"drafter: {e.reason}") from None


BUNDLED_EAGLE = Path(__file__).resolve().parents[2] / "assets" / "eagle-smollm2-135m-instruct"


def make_drafter(kind: str, path: str | None, target_vocab: int, dtype: str = "bfloat16",
                 max_context: int = 2048, target_folder: str | Path | None = None) -> Drafter:
    """Build the drafter a topology or a command line names. `eagle` without a path is the
    head trained for the default model (it shares that model's embedding and lm_head)."""
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
        from ...model.config import ModelConfig
        from ...model.loader import EMBED, WeightStore, lm_head_name
        from ...model.stage import parse_dtype
        from .eagle import EagleDrafter, EagleHead

        if target_folder is None:
            raise ModelError("the eagle drafter needs the target model's folder")
        folder = Path(path) if path else BUNDLED_EAGLE
        if not folder.is_dir():
            raise ModelError(f"EAGLE head folder {folder} not found")
        tf = Path(target_folder)
        cfg = ModelConfig.from_file(str(tf / "config.json"))
        store = WeightStore.open(tf)
        names = sorted({EMBED, lm_head_name(cfg, store)})
        w = store.load(names, parse_dtype(dtype))
        head = EagleHead.load(folder, w[EMBED], w[lm_head_name(cfg, store)], dtype=parse_dtype(dtype))
        if head.cfg.hidden_size != cfg.hidden_size:
            raise ModelError(f"EAGLE head {folder} has width {head.cfg.hidden_size}, the target {cfg.hidden_size}")
        return EagleDrafter(head, max_context)
    raise ModelError(f"unknown drafter {kind!r}; use {DRAFTER_HELP}")


__all__ = ["Drafter", "DraftView", "NoDrafter", "LookupDrafter", "make_drafter", "parse_drafter",
           "DRAFTER_HELP"]
