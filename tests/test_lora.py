"""LoRA's forward and gradients against the slow, obvious reference: the same model with W + scale·B·A as weight."""

import pytest
import torch
from torch.func import functional_call

import leantune
from conftest import fixed_batch, logits, tiny
from leantune.anatomy import is_conv1d
from leantune.methods import fused
from leantune.methods.base import ConfigError


def _tuned(model_name, dtype=torch.float32, **options):
    torch.manual_seed(0)
    model, _ = leantune.load_model(model_name)
    method = leantune.apply(model, "lora", r=4, **options)
    model.to(dtype)  # base and adapter alike
    with torch.no_grad():  # B starts at zero; give it values so the branch takes part in the gradients
        for mod in method.layers.values():
            mod.lora.B.normal_(0, 0.1)
    return model, method


def _reference_loss(model, method, ids, embeds):
    """Loss of the model with every adapter folded into its layer's weight inside autograd, adapters switched off."""
    leaves = {name: (mod.lora.A.detach().clone().requires_grad_(), mod.lora.B.detach().clone().requires_grad_())
              for name, mod in method.layers.items()}
    params = {}
    for name, mod in method.layers.items():
        a, b = leaves[name]
        delta = (b @ a) * mod.lora.scale
        params[f"{name}.weight"] = mod.weight.detach() + (delta.t() if is_conv1d(mod) else delta)
        mod.lora.active = False
    try:
        out = functional_call(model, params, kwargs={"inputs_embeds": embeds, "labels": ids}, strict=False)
    finally:
        for mod in method.layers.values():
            mod.lora.active = True
    return out.loss, leaves


@pytest.mark.parametrize("path", ["fused", "layer-then-term"])
@pytest.mark.parametrize("model_name", ["builtin:tiny-llama", "builtin:tiny-gpt2"])
def test_gradients_match_the_folded_weight_reference(model_name, path, monkeypatch):
    if path == "layer-then-term":  # what autocast, dropout or another library's forward fall back to
        monkeypatch.setattr(fused, "can_fuse", lambda *a: False)
    # float64 on both sides: the two sum in different orders, and fp32's rounding of that reaches 4e-4 relative
    # on small entries, where float64's stays below 1e-12
    model, method = _tuned(model_name, dtype=torch.float64, targets="all-linear")
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    embeds = model.get_input_embeddings()(ids).detach()

    x_ref = embeds.clone().requires_grad_()
    ref_loss, leaves = _reference_loss(model, method, ids, x_ref)
    ref_loss.backward()

    x = embeds.clone().requires_grad_()
    loss = model(inputs_embeds=x, labels=ids).loss
    loss.backward()

    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    node = type(next(iter(method.layers.values()))(x).grad_fn).__name__
    assert ("_LoraLinear" in node) == (path == "fused")
    # the input gradient flows through the base weight and the adapter's branch, summed
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
    for name, mod in method.layers.items():
        a_ref, b_ref = leaves[name]
        torch.testing.assert_close(mod.lora.A.grad, a_ref.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mod.lora.B.grad, b_ref.grad, rtol=1e-9, atol=1e-12)


def test_inference_mode_and_no_grad_forwards_equal_the_training_forward():
    model, _ = _tuned("builtin:tiny-llama")
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(2))
    model.eval()
    train_logits = model(input_ids=ids).logits.detach()
    with torch.no_grad():
        no_grad = model(input_ids=ids).logits
    with torch.inference_mode():
        inference = model(input_ids=ids).logits.clone()
    torch.testing.assert_close(no_grad, train_logits, rtol=0, atol=0)
    torch.testing.assert_close(inference, train_logits, rtol=0, atol=0)


def test_remove_gives_the_layers_their_own_forward_back():
    model, method = _tuned("builtin:tiny-llama")
    layers = list(method.layers.values())
    assert all("forward" in m.__dict__ for m in layers)
    method.remove()
    assert not any("forward" in m.__dict__ or hasattr(m, "lora") for m in layers)


def test_a_forward_another_library_installed_still_runs():
    # e.g. accelerate's device hooks replace module.forward; LoRA must call it, not the class's forward
    torch.manual_seed(0)
    model, _ = leantune.load_model("builtin:tiny-llama")
    q = model.model.layers[0].self_attn.q_proj
    calls = []
    own = q.forward

    def wrapper(x):
        calls.append(1)
        return own(x)

    q.forward = wrapper
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(4))
    plain = model(input_ids=ids).logits
    method = leantune.apply(model, "lora", r=4)
    with torch.no_grad():
        q.lora.B.normal_(0, 0.1)
    calls.clear()
    tuned = model(input_ids=ids).logits
    assert calls == [1] and not torch.allclose(tuned, plain)
    method.remove()
    assert q.forward is wrapper


def _allocations(fn) -> list[int]:
    from leantune.measure.memory import allocations

    return allocations(fn, min_bytes=17)  # no scalars


def test_fused_layer_allocates_no_full_width_temporary(monkeypatch):
    # Forward and backward of one adapted layer allocate exactly: the output (tokens x out), x·Aᵀ and its gradient
    # (tokens x r each), x's gradient (tokens x in), and A's and B's gradients. The layer-then-term path needs more:
    # autograd sums x's two gradients (through W and through B·A) into a new full-width tensor.
    torch.manual_seed(0)
    model, _ = leantune.load_model("builtin:tiny-llama")
    r = 4
    leantune.apply(model, "lora", r=r)
    q = model.model.layers[0].self_attn.q_proj
    tokens, d_in, d_out = 2 * 7, q.in_features, q.out_features
    x = torch.randn(2, 7, d_in, requires_grad=True)
    g = torch.randn(2, 7, d_out)
    fused_allocs = _allocations(lambda: q(x).backward(g))
    expected = sorted(4 * n for n in (tokens * d_out, tokens * r, tokens * r, tokens * d_in, r * d_in, d_out * r))
    assert fused_allocs == expected
    x.grad = None
    q.lora.A.grad = q.lora.B.grad = None
    monkeypatch.setattr(fused, "can_fuse", lambda *a: False)
    unfused = _allocations(lambda: q(x).backward(g))
    assert sum(unfused) - sum(fused_allocs) >= 4 * tokens * d_in


def test_bf16_autocast_runs_fused_and_stays_as_close_to_fp32_as_plain_autocast(monkeypatch):
    # Under autocast the fused function computes in bf16 like the layer's own F.linear would. Its loss and
    # gradients must stay as close to the fp32 run as the unfused path's (plain autocast) are, and A and B get
    # their gradients in their own dtype (fp32).
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(5))

    def run(mode):
        model, method = _tuned("builtin:tiny-llama", targets="all-linear")
        if mode == "unfused":
            monkeypatch.setattr(fused, "can_fuse", lambda *a: False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            loss = model(input_ids=ids, labels=ids).loss
            node = type(next(iter(method.layers.values()))(torch.randn(1, 2, 64)).grad_fn).__name__
        loss.backward()
        monkeypatch.undo()
        grads = torch.cat([p.grad.flatten() for _, p in method.trainable_parameters()])
        assert all(p.grad.dtype == torch.float32 for _, p in method.trainable_parameters())
        return loss.item(), grads, node

    exact_loss, exact, _ = run("fp32")
    f_loss, f_grads, f_node = run("fused")
    u_loss, u_grads, u_node = run("unfused")
    assert "_LoraLinear" in f_node and "_LoraLinear" not in u_node
    f_err, u_err = (f_grads - exact).norm() / exact.norm(), (u_grads - exact).norm() / exact.norm()
    assert f_err <= 1.25 * u_err and f_err < 0.05
    assert abs(f_loss - exact_loss) <= 1.25 * abs(u_loss - exact_loss) + 1e-3


def test_a_deep_copy_computes_with_its_own_adapter():
    # e.g. a frozen reference model made with copy.deepcopy (TRL does this): the copy's layers must use the copy's
    # LoRA weights, not the original's
    import copy

    model, method = _tuned("builtin:tiny-llama")
    twin = copy.deepcopy(model)
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for mod in twin.leantune_method.layers.values():
            mod.lora.B.zero_()  # the copy's adapter is now the identity
        plain = twin(input_ids=ids).logits
        for mod in method.layers.values():
            mod.lora.active = False
        base = model(input_ids=ids).logits
    assert not torch.allclose(before, plain)
    torch.testing.assert_close(plain, base)  # the copy ran its own (identity) adapter, not the original's


@pytest.mark.parametrize("name", ["builtin:tiny-mixtral", "builtin:tiny-qwen2-moe"])
def test_expert_lora_equals_experts_with_the_low_rank_update_added(name, tmp_path):
    """experts=true: a pair per routed expert on the 3-D parameters. Reference: a plain model whose expert weights
    are W_e + scale * B_e A_e, written by hand; then merge, save/load and the merged export agree with it."""
    from transformers import AutoModelForCausalLM

    from leantune.export import save_merged

    model, tok = tiny(name)
    batch = fixed_batch(len(tok))
    m = leantune.apply(model, "lora", experts=True, r=4, alpha=8, targets="q")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in m.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = logits(model, batch)
    ref, _ = tiny(name)
    with torch.no_grad():
        for (_n, mod), layer in zip(m.experts.items(), ref.model.layers, strict=True):
            for attr in ("gate_up_proj", "down_proj"):
                pair = getattr(mod, f"lora_{attr}")
                getattr(layer.mlp.experts, attr).add_(torch.einsum("eor,eri->eoi", pair.B, pair.A) * (8 / 4))
            q = ref.model.layers[layer.self_attn.layer_idx].self_attn.q_proj
            src = dict(m.layers)[f"model.layers.{layer.self_attn.layer_idx}.self_attn.q_proj"].lora
            q.weight.add_(src.B @ src.A * 2.0)
    torch.testing.assert_close(ours, logits(ref, batch), rtol=1e-5, atol=1e-5)
    assert any("experts.lora_down_proj" in n for n, _ in m.trainable_parameters())
    leantune.save(model, tmp_path / "a")
    fresh, _ = tiny(name)
    leantune.load(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh, batch), ours, rtol=0, atol=0)
    save_merged(model, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(plain, batch), ours, rtol=1e-5, atol=1e-5)


def test_expert_lora_refusals():
    model, _ = tiny("builtin:tiny-llama")
    with pytest.raises(ConfigError, match="no routed experts"):
        leantune.apply(model, "lora", experts=True)
    model, _ = tiny("builtin:tiny-mixtral")
    with pytest.raises(ConfigError, match="experts=true takes plain LoRA"):
        leantune.apply(model, "lora", experts=True, dora=True)
