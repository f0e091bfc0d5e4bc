"""The recipe that pretrains ``builtin:base``: corpus -> tokenizer -> LLaMA model -> weights in fp16.

Read it top to bottom: :data:`RECIPE` holds every number; :func:`build_base` runs it. The recipe hash covers
RECIPE and the corpus generator's version, so shipped weights that no longer match the code are detected.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from .corpus import CORPUS_VERSION, CorpusConfig, CorpusStream, heldout_texts

RECIPE: dict = {
    "corpus": asdict(CorpusConfig()),
    "heldout": {"n_docs": 300, "seed": 12345},
    "tokenizer": {"vocab_size": 1024, "n_docs": 20000},
    # LLaMA: grouped-query attention (8 query heads on 2 KV heads), RoPE, SwiGLU; about 3.4M parameters.
    "model": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256, "rope_theta": 10000.0,
              "tie_word_embeddings": False},
    # bf16 autocast (fp32 master weights and optimizer): about 1.3x faster on a CPU with AVX512-BF16.
    "train": {"steps": 3000, "batch_size": 32, "seq_len": 48, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup": 150,
              "weight_decay": 0.01, "betas": [0.9, 0.98], "max_grad_norm": 1.0, "precision": "bf16", "seed": 0},
}

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# One pre-token per word, per digit (with its leading space) and per punctuation run: digits stay single
# tokens so numbers and digit lists tokenize the same way everywhere.
_PRETOKEN_PATTERN = r" ?[0-9]| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+"


def make_recipe(seed: int = 0, **overrides) -> dict:
    """RECIPE with the training seed set and ``overrides`` (``{"train": {"steps": 300}}``) merged in."""
    recipe = copy.deepcopy(RECIPE)
    recipe["train"]["seed"] = seed
    for section, values in overrides.items():
        if section not in recipe:
            raise ValueError(f"unknown recipe section {section!r}; sections: {sorted(recipe)}")
        unknown = set(values) - set(recipe[section])
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in recipe section {section!r}")
        recipe[section].update(values)
    return recipe


def recipe_hash(recipe: dict | None = None) -> str:
    """sha256 of the recipe and the corpus generator version (first 16 hex digits)."""
    payload = json.dumps({"recipe": recipe or make_recipe(), "corpus_version": CORPUS_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``docs`` (pad/bos/eos are ids 0/1/2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   model_max_length=RECIPE["model"]["max_position_embeddings"])


def make_model(tokenizer, model_cfg: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **model_cfg)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def packed_batches(stream: CorpusStream, tokenizer, batch_size: int, seq_len: int):
    """Endless ``(batch, seq_len + 1)`` id tensors: BOS + document + EOS, concatenated and cut into rows.

    Documents get a leading space so a name tokenizes the same at the start of a document as inside one."""
    buf: list[int] = []
    need = batch_size * (seq_len + 1)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    while True:
        while len(buf) < need:
            docs = stream.docs(64)
            for ids in tokenizer([" " + d for d in docs], add_special_tokens=False)["input_ids"]:
                buf.extend([bos, *ids, eos])
        yield torch.tensor(buf[:need]).view(batch_size, seq_len + 1)
        buf = buf[need:]


@torch.no_grad()
def text_loss(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over ``texts``, each scored on its own as BOS + " " + text + EOS (the form
    the build trains on)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        rows = [[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
                for ids in tokenizer([" " + x for x in texts[i:i + batch_size]], add_special_tokens=False)["input_ids"]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / count


def _lr(step: int, t: dict) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < t["warmup"]:
        return t["lr"] * (step + 1) / t["warmup"]
    progress = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
    return t["lr"] * (t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_base(output_dir: str | os.PathLike, seed: int = 0, progress: bool = True, log_every: int = 100,
               threads: int | None = None, **overrides) -> dict:
    """Pretrain the base model and write it to ``output_dir`` (model.safetensors in fp16, config.json, tokenizer
    files, recipe.json). Returns the contents of recipe.json. ``overrides`` change recipe sections (a pilot run:
    ``train={"steps": 300}``); they change the hash too. ``threads``: torch CPU threads (1 is fastest on a
    machine shared with other jobs)."""
    from tqdm.auto import tqdm

    if threads is not None:
        torch.set_num_threads(threads)
    recipe = make_recipe(seed, **overrides)
    t = recipe["train"]
    corpus_cfg = CorpusConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe["corpus"].items()})
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    heldout = heldout_texts(corpus_cfg, recipe["heldout"]["n_docs"], recipe["heldout"]["seed"])
    stream = CorpusStream(corpus_cfg, seed=t["seed"], exclude=frozenset(heldout))
    tokenizer = train_tokenizer(stream.docs(recipe["tokenizer"]["n_docs"]), recipe["tokenizer"]["vocab_size"])
    model = make_model(tokenizer, recipe["model"], t["seed"])
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms: no weight decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t["lr"], betas=tuple(t["betas"]))
    batches = packed_batches(stream, tokenizer, t["batch_size"], t["seq_len"])
    bar = tqdm(total=t["steps"], desc="pretrain builtin:base", unit="step", disable=not progress,
               dynamic_ncols=True)
    ema, recent, history = None, [], []
    for step in range(t["steps"]):
        for group in opt.param_groups:
            group["lr"] = _lr(step, t)
        ids = next(batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=t["precision"] == "bf16"):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        recent = [*recent[-99:], value]
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}")
        if (step + 1) % log_every == 0 or step + 1 == t["steps"]:
            history.append({"step": step + 1, "loss": round(ema, 4),
                            "seconds": round(time.perf_counter() - t_start, 1)})
            if not progress:
                print(json.dumps(history[-1]), flush=True)
    bar.close()
    train_seconds = time.perf_counter() - t_start

    # Ship fp16 weights; the recorded held-out loss is that of the fp16 weights (what users load).
    model = model.half().float()
    model.eval()
    info = {
        "name": "builtin:base",
        "recipe_hash": recipe_hash(recipe),
        "corpus_version": CORPUS_VERSION,
        "recipe": recipe,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": t["steps"],
        "tokens_seen": t["steps"] * t["batch_size"] * t["seq_len"],
        "final_train_loss": round(sum(recent) / len(recent), 4),  # mean of the last 100 steps
        "heldout_loss": text_loss(model, tokenizer, heldout),
        "seconds": round(train_seconds, 4),
        "torch": torch.__version__,
        "history": history,
    }
    model.half().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


if __name__ == "__main__":  # python -m leantune.base.build OUTPUT_DIR [--steps N] [--threads N]
    import argparse

    parser = argparse.ArgumentParser(description="Pretrain builtin:base from its recipe.")
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps (a pilot run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true", help="log JSON lines instead of a progress bar")
    args = parser.parse_args()
    extra = {"train": {"steps": args.steps}} if args.steps else {}
    result = build_base(args.output_dir, seed=args.seed, progress=not args.no_progress, threads=args.threads, **extra)
    print(json.dumps({k: v for k, v in result.items() if k not in ("recipe", "history")}, indent=2))
