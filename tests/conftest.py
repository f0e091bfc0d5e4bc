"""Shared test helpers: tiny models built in code, a fixed batch, logits."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("LEANTUNE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_MODELS = ["builtin:tiny-llama", "builtin:tiny-gpt2", "builtin:tiny-bert"]


def tiny(name: str = "builtin:tiny-llama"):
    from leantune import load_model

    return load_model(name)


def fixed_batch(vocab: int = 259, batch: int = 2, length: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def for_model(model, batch: dict) -> dict:
    """``batch`` as ``model`` reads it: an encoder-decoder (T5) also gets decoder inputs, the labels shifted right
    behind its decoder start token (the encoder reads input_ids; the decoder learns to copy them)."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False) or "decoder_input_ids" in batch:
        return batch
    labels = batch["labels"]
    start = torch.full_like(labels[:, :1], config.decoder_start_token_id)
    dec = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
    return {**batch, "decoder_input_ids": dec, "decoder_attention_mask": torch.ones_like(dec)}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    was = model.training
    model.eval()
    batch = for_model(model, batch)
    extra = {k: batch[k] for k in ("decoder_input_ids", "decoder_attention_mask") if k in batch}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
    model.train(was)
    return out


def loss_of(model, batch) -> torch.Tensor:
    from leantune.anatomy import anatomy
    from leantune.train.loop import token_loss_sum

    causal = anatomy(model).causal
    total, n = token_loss_sum(model, for_model(model, batch), causal)
    return total / n


def perturbed_adapter(folder, model, method: str, noise_seed: int, scale: float, **opts):
    """Apply ``method`` to ``model``, move every float tensor of its state off its neutral init by seeded noise
    (trained-looking values), save it in ``folder`` and return the folder."""
    import leantune

    m = leantune.apply(model, method, **opts)
    g = torch.Generator().manual_seed(noise_seed)
    m.load_state({k: v + torch.randn(v.shape, generator=g).to(v.dtype) * scale if v.is_floating_point() else v
                  for k, v in m.state().items()})
    leantune.save(model, folder)
    return folder


def train_steps(model, batch, steps: int = 1, lr: float = 1e-2):
    params = [p for _, p in model.leantune_method.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they spin: one thread, restored after.
    A test module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
