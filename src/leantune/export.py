"""Export a fine-tune in the formats the rest of the ecosystem loads.

``merged``: a plain Hugging Face model folder (config, safetensors weights, tokenizer) with the fine-tune folded
into the weights, which ``transformers`` loads by itself (``AutoModelForCausalLM.from_pretrained``); any method
whose ``merge_and_unload()`` is implemented. The ``peft`` format (:mod:`leantune.interop.peft`) and
``leantune export`` (``pipeline.export_adapter``, which loads the base and the adapter first) build on it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .quant import dequantize_model_, quantization_of


def check_plain_architecture(model: nn.Module) -> None:
    """Raise unless ``model`` has exactly the tensors a fresh model of its class builds from its config, so that
    ``from_pretrained`` on the saved folder restores every tensor and invents none."""
    with torch.device("meta"):
        fresh = type(model)(copy.deepcopy(model.config))
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    wrong = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    if extra or missing or wrong:
        raise ValueError(
            f"the merged model does not match what its config builds ({type(model).__name__}): extra tensors "
            f"{extra[:4]}, missing {missing[:4]}, other shapes {wrong[:4]}. transformers would drop or invent them "
            "on load, so the export stops here; export the adapter instead"
        )


def empty_output(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"output folder {str(directory)!r} exists and is not empty; choose a new or empty folder")


def save_merged(model: nn.Module, tokenizer, directory: str | os.PathLike) -> dict:
    """Fold the fine-tune that ``model`` carries into its weights, take the method off and save a plain Hugging
    Face model folder (and ``tokenizer`` when given); returns ``{"output_dir", "kind", "reason"}``. ``model`` is
    the plain merged model afterwards, also when the architecture check refuses it (then nothing is written:
    reload the base and the adapter). A method that changes the architecture writes its own folder
    (``Method.save_merged``; Light-PEFT), which says whether ``transformers`` loads it alone, and why."""
    method = getattr(model, "leantune_method", None)
    if method is None:
        raise ValueError("this model carries no leantune method: load or apply one first")
    directory = Path(directory)
    empty_output(directory)
    quant = quantization_of(model)
    if quant is not None:
        # never a silently re-quantized merge: the weights the adapter was trained against (dequantized), in the
        # dtype the base was quantized from, take the fine-tune; the folder is a full-precision model
        n = dequantize_model_(model)
        note = (f"the base was {quant.type}-quantized: its {n} quantized layers were dequantized (the weights the "
                "adapter trained against) to the base's full-precision dtype and the fine-tune merged into them; "
                "the folder is a full-precision model, not re-quantized (quantize it again when loading if wanted)")
    own = method.save_merged(directory, tokenizer)
    if own is not None:
        return {"output_dir": str(directory), **own, **({"quantization_note": note} if quant is not None else {})}
    try:
        plain = method.merge_and_unload()
    except NotImplementedError as e:
        raise ValueError(f"{e.args[0]} (a merged export needs a mergeable method with merge_and_unload)") from None
    check_plain_architecture(plain)
    plain.config.use_cache = True  # training switched the cache off; a served model wants it
    plain.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return {"output_dir": str(directory), "kind": "huggingface",
            "reason": "the merged weights fit the model's own config: transformers loads the folder by itself",
            **({"quantization_note": note} if quant is not None else {})}
