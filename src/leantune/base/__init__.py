"""``builtin:base``: a small LLaMA model that leantune pretrains itself on its own synthetic corpus.

The weights ship in ``leantune/assets/base/``; :func:`build.build_base` rebuilds them from the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "base"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "recipe.json")


def load_base(path: str | Path | None = None):
    """``(model, tokenizer)`` of the pretrained base (fp32 in memory, fp16 on disk), from the shipped assets or
    from ``path`` (a folder written by ``build_base``). Never touches the network."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(path) if path is not None else ASSETS_DIR
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the built-in base model is incomplete in {folder}: missing {', '.join(missing)}. Rebuild it with "
            "`leantune base build` (or leantune.base.build.build_base(dir)), or reinstall leantune."
        )
    model = LlamaForCausalLM.from_pretrained(folder, dtype="float32", local_files_only=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def base_info(path: str | Path | None = None) -> dict:
    """The shipped ``recipe.json``: recipe, its hash, parameter count, losses, steps, seconds."""
    folder = Path(path) if path is not None else ASSETS_DIR
    return json.loads((folder / "recipe.json").read_text())


__all__ = ["ASSETS_DIR", "base_info", "load_base"]
