"""S²FT on a mixture of experts: channels selected per routed expert in the 3-D ``experts.down_proj`` [E, H, I] (and
the up half of ``experts.gate_up_proj`` [E, 2I, H]), each expert's dense block trained with the gradient the full weight would get on those columns (the family matrix walks
apply / train / save / load / merge / export on Mixtral and Qwen2-MoE)."""

from __future__ import annotations

import pytest
import torch

import leantune
from conftest import fixed_batch, logits, loss_of, tiny
from leantune.methods.base import ConfigError

MIXTRAL = "builtin:tiny-mixtral"


def _channels(method):
    return [(name, c, w) for name, _mod, c, w in method._expert_channels()]


def test_each_expert_trains_its_own_channels_with_the_full_weight_gradient():
    model, tok = tiny(MIXTRAL)
    batch = fixed_batch(len(tok))
    method = leantune.apply(model, "s2ft")
    chans = _channels(method)
    assert len(chans) == 2  # one per block
    with torch.no_grad():  # move off zero, so the gradient is taken at a point where the blocks act
        for _, c, _ in chans:
            c.delta.normal_(0, 0.05)
    loss_of(model, batch).backward()

    # the slow reference: the same weights merged into a plain model, the whole down_proj trainable
    reference, _ = tiny(MIXTRAL)
    names = dict(reference.named_modules())
    for name, c, _ in chans:
        w = names[name.rsplit(".", 1)[0]].down_proj
        with torch.no_grad():
            w.scatter_add_(2, c.spread(w), c.delta.to(w.dtype))
        w.requires_grad_(True)
    for mod_name, mod in dict(model.named_modules()).items():  # o's blocks too: the same function as the model's
        if hasattr(mod, "s2ft") and mod_name in method.layers:
            with torch.no_grad():
                names[mod_name].weight.copy_(mod.weight)
    loss_of(reference, batch).backward()
    for name, c, _ in chans:
        full = names[name.rsplit(".", 1)[0]].down_proj.grad
        assert c.indices.shape[0] == full.shape[0] and c.delta.grad.abs().sum() > 0
        torch.testing.assert_close(c.delta.grad, full.gather(2, c.spread(full)), rtol=1e-5, atol=1e-7)


def test_channels_are_drawn_per_expert_within_the_budget():
    model, _ = tiny(MIXTRAL)
    method = leantune.apply(model, "s2ft", budget="count", heads=1, channels=5)
    for _, c, w in _channels(method):
        e, h, i = w.shape
        assert tuple(c.indices.shape) == (e, 5) and tuple(c.delta.shape) == (e, h, 5)
        assert all(torch.equal(row, torch.sort(torch.unique(row)).values) for row in c.indices)
        assert int(c.indices.max()) < i
        assert len({tuple(r.tolist()) for r in c.indices}) > 1  # not one draw shared by every expert
    assert method.num_trainable() == method.num_changed()
    by_weight = leantune.apply(tiny(MIXTRAL)[0], "s2ft", budget="count", heads=1, channels=5, selection="weight")
    for _, c, w in _channels(by_weight):
        smallest = torch.sort(torch.argsort(w.detach().norm(dim=1), dim=1)[:, :5], dim=1).values
        assert torch.equal(c.indices, smallest)


def test_merge_adds_each_block_on_its_channels_and_unmerge_is_bitwise():
    model, tok = tiny(MIXTRAL)
    method = leantune.apply(model, "s2ft")
    base = {name: w.detach().clone() for name, _, w in _channels(method)}
    with torch.no_grad():
        for _, c, _ in _channels(method):
            c.delta.normal_(0, 0.1)
    batch = fixed_batch(len(tok))
    unmerged = logits(model, batch)
    method.merge()
    for name, c, w in _channels(method):
        expected = base[name].clone()
        for e in range(w.shape[0]):
            expected[e][:, c.indices[e]] += c.delta[e].detach()
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=1e-5)
    method.unmerge()
    assert all(torch.equal(w.detach(), base[name]) for name, _, w in _channels(method))


def test_a_state_for_other_experts_is_refused():
    model, _ = tiny(MIXTRAL)
    method = leantune.apply(model, "s2ft")
    state = dict(method.state())
    key = next(k for k in state if k.endswith("expert_indices"))
    state[key] = state[key][:-1]  # one expert short
    with pytest.raises(ValueError, match="do not fit 4 experts"):
        method.load_state(state)


def test_activation_selection_without_the_experts_activation_is_refused_at_apply():
    model, _ = tiny(MIXTRAL)
    for layer in model.model.layers:  # an experts module leantune cannot compute act(gate)·up for
        del layer.mlp.experts.act_fn
    with pytest.raises(ConfigError, match="no act_fn"):
        leantune.apply(model, "s2ft", selection="activation")
    assert all(p.requires_grad for p in model.parameters())  # refused before touching the model


# -- up: output rows of the up half of the fused gate_up_proj [E, 2I, H] ----------------------------------------


def test_up_trains_rows_of_the_up_half_of_each_experts_gate_up_with_the_full_weight_gradient():
    model, tok = tiny(MIXTRAL)
    batch = fixed_batch(len(tok))
    method = leantune.apply(model, "s2ft", targets="o,down,up", budget="count", heads=1, channels=3)
    ups = [(name, c, w) for name, c, w in _channels(method) if name.endswith("gate_up_proj")]
    assert len(ups) == 2
    inter = method.anatomy.intermediate
    for name, c, w in ups:
        e, two_i, h = w.shape
        assert two_i == 2 * inter and tuple(c.delta.shape) == (e, 3, h)
        units = torch.tensor(method.selected_units()[name])
        assert torch.equal(c.indices, units + inter)  # the up half: channel c is row I + c (the anatomy's offset)
    with torch.no_grad():
        for _, c, _ in _channels(method):
            c.delta.normal_(0, 0.05)
    loss_of(model, batch).backward()

    # the slow reference: each expert's weights written out as transformers splits them (gate, up = chunk(2)), the
    # block added on the up matrix's rows of the selected channels, the whole 3-D parameters trainable
    reference, _ = tiny(MIXTRAL)
    names = dict(reference.named_modules())
    for name, c, _ in _channels(method):
        module, attr = name.rsplit(".", 1)
        w = getattr(names[module], attr)
        with torch.no_grad():
            if attr == "gate_up_proj":
                gate, up = w.chunk(2, dim=1)
                for e, chans in enumerate(method.selected_units()[name]):
                    up[e, chans] += c.delta[e].detach()
                w.copy_(torch.cat([gate, up], dim=1))
            else:
                w.scatter_add_(2, c.spread(w), c.delta.to(w.dtype))
        w.requires_grad_(True)
    for mod_name, mod in dict(model.named_modules()).items():
        if hasattr(mod, "s2ft") and mod_name in method.layers:
            with torch.no_grad():
                names[mod_name].weight.copy_(mod.weight)
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=1e-5, atol=1e-6)
    loss_of(reference, batch).backward()
    for name, c, _ in _channels(method):
        module, attr = name.rsplit(".", 1)
        full = getattr(names[module], attr).grad
        assert c.delta.grad.abs().sum() > 0
        torch.testing.assert_close(c.delta.grad, full.gather(c.dim, c.spread(full)), rtol=1e-5, atol=1e-7)


def test_up_expert_rows_merge_save_and_load(tmp_path):
    model, tok = tiny(MIXTRAL)
    batch = fixed_batch(len(tok))
    method = leantune.apply(model, "s2ft", targets="o,up", budget="count", heads=1, channels=4, selection="weight")
    base = {name: w.detach().clone() for name, _, w in _channels(method)}
    for name, _c, w in _channels(method):  # by weight norm: each expert's smallest up rows
        norms = w.detach().float().pow(2).sum(2)[:, method.anatomy.expert_ffn_rows("up")].sqrt()
        assert torch.equal(torch.tensor(method.selected_units()[name]),
                           torch.sort(torch.argsort(norms, dim=1)[:, :4], dim=1).values)
    with torch.no_grad():
        for _, c, _ in _channels(method):
            c.delta.normal_(0, 0.1)
    unmerged = logits(model, batch)
    leantune.save(model, tmp_path / "up")
    fresh, _ = tiny(MIXTRAL)
    leantune.load(fresh, tmp_path / "up")
    torch.testing.assert_close(logits(fresh, batch), unmerged, rtol=0, atol=0)
    method.merge()
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=1e-5)
    method.unmerge()
    assert all(torch.equal(w.detach(), base[name]) for name, _, w in _channels(method))
    from transformers import AutoModelForCausalLM

    from leantune.export import save_merged

    assert save_merged(model, tok, tmp_path / "merged")["kind"] == "huggingface"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # transformers alone reads the merged experts
    torch.testing.assert_close(logits(plain, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_gradient_selection_picks_each_experts_channels_by_the_full_gradient():
    model, tok = tiny(MIXTRAL)
    batch = fixed_batch(len(tok))
    method = leantune.apply(model, "s2ft", targets="o,down,up", budget="count", heads=1, channels=3,
                            selection="gradient").calibrate([batch])
    reference, _ = tiny(MIXTRAL)  # the untouched base, every weight trainable: its gradient is the score
    loss_of(reference, batch).backward()
    names = dict(reference.named_modules())
    rows = method.anatomy.expert_ffn_rows("up")
    for name, _c, _w in _channels(method):
        module, attr = name.rsplit(".", 1)
        g = getattr(names[module], attr).grad
        norms = g.pow(2).sum(1).sqrt() if attr == "down_proj" else g.pow(2).sum(2)[:, rows].sqrt()
        assert torch.equal(torch.tensor(method.selected_units()[name]),
                           torch.sort(torch.argsort(norms, dim=1)[:, :3], dim=1).values), name


def test_no_lora_form_for_expert_channels():
    model, _ = tiny(MIXTRAL)
    method = leantune.apply(model, "s2ft")
    assert method.lora_factors() is None
    with pytest.raises(ValueError, match="no LoRA form"):
        method.to_lora()


def test_the_adapter_bank_serves_expert_channels_through_the_switch(tmp_path):
    from leantune.serve.bank import AdapterBank
    from test_bank import alone, base, ids, make_adapter, params

    folder = make_adapter(tmp_path / "s2ft", MIXTRAL, "s2ft", 1)
    model = base(MIXTRAL)
    before = params(model)
    bank = AdapterBank(model)
    bank.add("experts", folder)
    assert not bank.adapters["experts"].mixed  # no per-layer terms: served by the switch
    x = ids(5, b=2)
    got = bank.forward(x, ["experts", None])
    torch.testing.assert_close(got[:1], alone(MIXTRAL, folder, x[:1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:], alone(MIXTRAL, None, x[1:]), atol=0, rtol=0)
    bank.switch(None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class _ExpertProducts(torch.overrides.TorchFunctionMode):
    """Records, per routed expert, the squared norms of what its own matmuls see: the input of ``down_proj[e]`` (the
    activation act(gate)·up) and the output of ``gate_up_proj[e]``, found by the weight's storage address."""

    def __init__(self, model):
        super().__init__()
        self.where, self.sums = {}, {}
        for name, p in model.named_parameters():
            if name.endswith(("experts.down_proj", "experts.gate_up_proj")):
                for e in range(p.shape[0]):
                    self.where[p[e].data_ptr()] = (name, e, p.shape[0])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear and args[1].data_ptr() in self.where:
            name, e, n = self.where[args[1].data_ptr()]
            seen = args[0] if name.endswith("down_proj") else out
            sq = self.sums.setdefault(name, torch.zeros(n, seen.shape[-1]))
            sq[e] += seen.detach().float().pow(2).sum(0)
        return out


def test_activation_selection_scores_each_expert_by_what_its_own_matmuls_see():
    model, tok = tiny(MIXTRAL)
    batch = fixed_batch(len(tok))
    method = leantune.apply(model, "s2ft", targets="o,down,up", budget="count", heads=1, channels=3,
                            selection="activation").calibrate([batch])
    reference, _ = tiny(MIXTRAL)
    reference.config._experts_implementation = "eager"  # transformers' loop over experts: one matmul per expert
    with torch.no_grad(), _ExpertProducts(reference) as seen:
        reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert len(seen.sums) == 4  # both parameters of both blocks
    rows = method.anatomy.expert_ffn_rows("up")
    for name, _c, _w in _channels(method):
        sq = seen.sums[name]
        norms = sq.sqrt() if name.endswith("down_proj") else sq[:, rows].sqrt()
        assert torch.equal(torch.tensor(method.selected_units()[name]),
                           torch.sort(torch.argsort(norms, dim=1)[:, :3], dim=1).values), name


def test_activation_selection_of_expert_channels_skips_padding():
    model, tok = tiny(MIXTRAL)
    method = leantune.apply(model, "s2ft", targets="o,down,up", budget="count", heads=1, channels=3,
                            selection="activation")
    for mod in method.layers.values():
        mod.s2ft.active = False  # the base alone, as calibrate() scores it
    batch = fixed_batch(len(tok))
    batch["attention_mask"][1, 7:] = 0  # right padding: the real tokens' activations are the row's alone
    rows = [{k: v[i:i + 1, : (12 if i == 0 else 7)] for k, v in batch.items()} for i in range(2)]
    both = method._activation_scores([batch])
    alone = [method._activation_scores([r]) for r in rows]
    experts = [n for n, *_ in method._expert_channels()]
    assert len(experts) == 4
    for n in experts:
        torch.testing.assert_close(both[n] ** 2, alone[0][n] ** 2 + alone[1][n] ** 2, rtol=1e-4, atol=1e-6)


def _expert_opts(seed):
    from leantune.methods.s2ft import S2FTConfig

    return S2FTConfig(targets="o,down,up", budget="count", heads=1, channels=3, seed=seed)


def _trained_state(model, method):
    g = torch.Generator().manual_seed(len(method.state()) + method.config.seed)
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return {k: v.clone() for k, v in method.state().items()}


def _both_merged(states):
    """The slow reference: each adapter merged into the base in turn."""
    from leantune.methods.s2ft import S2FT

    model, _ = tiny(MIXTRAL)
    for state in states:
        method = leantune.apply(model, S2FT(_expert_opts(0)))
        method.load_state(state)
        method.merge()
        method.unload()  # the merged weights stay
    return model


def test_exclude_keeps_each_experts_channels_disjoint_and_fuse_adds_both_adapters():
    from leantune.methods.s2ft import S2FT, fuse

    model, tok = tiny(MIXTRAL)
    batch = fixed_batch(len(tok))
    first = _trained_state(model, leantune.apply(model, S2FT(_expert_opts(0))))
    other, _ = tiny(MIXTRAL)
    second_method = leantune.apply(other, S2FT(_expert_opts(1), exclude=first))
    second = _trained_state(other, second_method)
    for key in [k for k in first if k.endswith("expert_indices")]:
        assert all(not set(a.tolist()) & set(b.tolist()) for a, b in zip(first[key], second[key], strict=True))
    third, _ = tiny(MIXTRAL)
    overlapping = _trained_state(third, leantune.apply(third, S2FT(_expert_opts(2))))  # no exclude: channels shared
    for states in ([first, second], [first, overlapping]):
        if states[1] is overlapping:
            with pytest.warns(UserWarning, match="overlap"):
                fused = fuse(states)
            ks = {tuple(len(set(a.tolist()) | set(b.tolist())) for a, b in zip(first[k], overlapping[k], strict=True))
                  for k in first if k.endswith("expert_indices")}
            assert any(len(set(k)) > 1 for k in ks)  # unions of different sizes: some experts padded
        else:
            fused = fuse(states)
        target, _ = tiny(MIXTRAL)
        leantune.apply(target, S2FT(_expert_opts(0))).load_state(fused)
        torch.testing.assert_close(logits(target, batch), logits(_both_merged(states), batch), rtol=1e-5, atol=1e-5)
