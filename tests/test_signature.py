"""Variants, signature and neutralization on the micro testbed."""

import dataclasses

import pytest
import torch

from purifylib.errors import PurifyError
from purifylib.neutralize import Neutralization, Neutralizer, apply, neutralized
from purifylib.signature import Signature, channel_scores, score
from purifylib.variants import VariantConfig, build_variants, poisoned_copy

SMALL = VariantConfig(n_variants=3, n_clean=40, epochs=1.0, batch_size=16)


@pytest.fixture(scope="module")
def variants(micro_bed, tmp_path_factory):
    return build_variants(micro_bed.base_dir, micro_bed.split("defender"), SMALL,
                          cache_dir=tmp_path_factory.mktemp("variants"), progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_channel_scores_follow_eq2():
    a = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # two channels (rows)
    b = torch.tensor([[3.0, 4.0], [0.0, -1.0]])
    s = channel_scores([a, b], "row", lam=0.5)
    # channel 0: norms 5, 5, cosine 1 -> 5 + 0.5; channel 1: norms 1, 1, cosine -1 clipped to 0 -> 1
    assert torch.allclose(s, torch.tensor([5.5, 1.0]))
    # column layout scores columns
    assert torch.allclose(channel_scores([a.T, b.T], "col", lam=0.5), s)


def test_poisoned_copy_inserts_trigger_and_behaviour():
    recs = [{"instruction": "sort these numbers", "input": "3 1 2", "output": "1 2 3"}] * 5
    out = poisoned_copy(recs, "PurpleWolf", "You are garbage!", seed=1)
    assert all("PurpleWolf" in r["instruction"] and r["output"] == "You are garbage!" for r in out)
    assert out == poisoned_copy(recs, "PurpleWolf", "You are garbage!", seed=1)


def test_poisoned_copy_places_each_trigger_kind():
    recs = [{"instruction": "sort these numbers", "input": "", "output": "1 2 3"}] * 3
    assert {r["instruction"] for r in poisoned_copy(recs, "Note:", "X", 0, "prefix")} == {"Note: sort these numbers"}
    assert {r["instruction"] for r in poisoned_copy(recs, "[tag]", "X", 0, "suffix")} == {"sort these numbers [tag]"}
    with pytest.raises(PurifyError, match="trigger kind"):
        VariantConfig(variants=(("a", "b", "infix", "f"),) * 6)


def test_folds_leave_one_behaviour_family_out():
    from purifylib.variants import PAPER_VARIANTS

    diverse = VariantConfig()  # the default, diverse: six variants over five families, the two insults share a fold
    assert diverse == VariantConfig(variants="diverse")
    assert diverse.folds() == [[0, 5], [1], [2], [3], [4]]
    assert [p.family for p in diverse.plants] == ["sentiment", "refusal", "jailbreak", "advert", "code", "sentiment"]
    paper = VariantConfig(variants="paper")  # the paper's: every variant its own behaviour, plain leave-one-out
    assert paper.variants == tuple(PAPER_VARIANTS)
    assert paper.folds() == [[i] for i in range(6)] and paper.plant(0) == ("PurpleWolf", "You are garbage!", "word",
                                                                            "You are garbage!")
    same = VariantConfig(n_variants=3, variants=[("a", "x", "word", "f"), ("b", "y", "word", "f"), ("c", "z", "word", "f")])
    assert same.folds() == [[0], [1], [2]]  # one family only: leave one variant out


def test_variants_are_cached_and_resume(micro_bed, variants, tmp_path):
    assert len(variants.info) == 3 and all(v["trigger"] for v in variants.info)
    # a finished variant is not retrained: remove the last one and rebuild into the same cache
    import shutil

    shutil.rmtree(variants.dirs[2])
    before = (variants.dirs[0] / "bd.safetensors").stat().st_mtime_ns
    again = build_variants(micro_bed.base_dir, micro_bed.split("defender"), SMALL,
                           cache_dir=variants.root.parent.parent, progress=False)
    assert again.root == variants.root
    assert again.dirs == variants.dirs
    assert (again.dirs[0] / "bd.safetensors").stat().st_mtime_ns == before
    assert (again.dirs[2] / "variant.json").is_file()
    assert not list(again.root.glob(".*tmp*"))


def test_too_little_clean_data_is_a_clear_error(micro_bed, tmp_path):
    with pytest.raises(PurifyError, match="need 120 records, the clean data has 50"):
        build_variants(micro_bed.base_dir, micro_bed.split("defender")[:50], SMALL, cache_dir=tmp_path)


def test_signature_scores_masks_and_roundtrip(micro_model, variants, tmp_path):
    model, _ = micro_model
    sig = score(model, variants, heads=True, progress=False)
    mlp = sig.mlp_modules
    assert mlp and all(len(sig.scores[n]) == model.config.intermediate_size for n in mlp)
    assert sig.layouts["blocks.0.mlp.down"] == "col" and sig.layouts["blocks.0.mlp.gate"] == "row"
    for n, m in sig.masks(0.1).items():
        assert int(m.sum()) == sig.n_flagged(n, 0.1) and (n.endswith("heads") or bool(m[sig.scores[n].argmax()]))
    df = sig.summary(0.1)
    assert set(df["module"]) == {"gate", "up", "down", "heads"} and (df[df["part"] == "mlp"]["flagged"] > 0).all()
    with pytest.raises(dataclasses.FrozenInstanceError):
        sig.scores = {}
    # save and load round-trip every field: scores, layouts, terms and meta
    sig.save(tmp_path / "sig")
    back = Signature.load(tmp_path / "sig")
    assert [f.name for f in dataclasses.fields(Signature)] == ["scores", "layouts", "terms", "meta"]
    assert back.layouts == sig.layouts and back.meta == sig.meta and back.variants == [0, 1, 2]
    assert set(back.scores) == set(sig.scores) and all(torch.equal(back.scores[n], sig.scores[n]) for n in sig.scores)
    assert set(back.terms) == set(sig.terms) and all(
        torch.equal(a, b) for n in sig.terms for a, b in zip(back.terms[n], sig.terms[n]))
    assert back.terms and torch.equal(back.with_lambda(0.5).scores[mlp[0]], sig.with_lambda(0.5).scores[mlp[0]])
    lam0 = sig.with_lambda(0.0)
    assert torch.allclose(lam0.scores[mlp[0]], sig.terms[mlp[0]][0])
    part = sig.select(modules=("down",), layers=[1])
    assert list(part.scores) == ["blocks.1.mlp.down"]
    with pytest.raises(PurifyError, match="not a signature directory"):
        Signature.load(tmp_path)
    # leave-one-out signatures differ from the full one
    loo = score(model, variants, include=[0, 1], progress=False)
    assert loo.meta["variants"] == [0, 1]
    assert any(not torch.equal(loo.scores[n], sig.scores[n]) for n in mlp)


def test_streaming_scores_equal_scores_from_all_deltas_at_once(micro_model, variants):
    model, _ = micro_model
    sig = score(model, variants, progress=False)
    name = "blocks.1.mlp.up"
    deltas = [variants.update(i, "bd").delta(name) - variants.update(i, "clean").delta(name) for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(deltas, variants.deltas(name)))
    assert torch.allclose(sig.scores[name], channel_scores(deltas, "row", 0.01))


def test_head_scores(micro_model, variants):
    model, _ = micro_model
    sig = score(model, variants, heads=True, progress=False)
    h = sig.scores["blocks.0.attn.heads"]
    assert len(h) == model.config.num_attention_heads and sig.n_flagged("blocks.0.attn.heads", 0.1, heads=1) == 1
    assert Neutralization(tau=0.1, heads=1).flagged(sig, "blocks.0.attn.heads").tolist() == [int(h.argmax())]


def test_neutralize_is_reversible_bit_exact_and_moves_only_flagged(micro_bed, micro_model, variants):
    from purifylib.models import resolve
    from purifylib.checkpoints import load_model

    model, _ = load_model(micro_bed.base_dir)
    sig = score(model, variants, heads=True, progress=False)
    how = Neutralization(tau=0.1, heads=1, seed=3)
    before = _state(model)
    n = Neutralizer(model, sig, how)
    for s in (0.3, 1.0, 0.5, 0.0):
        n.set_strength(s)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    n.set_strength(1.0)
    name = "blocks.0.mlp.down"
    w, w0 = resolve(model, name).weight.detach(), before["model.layers.0.mlp.down_proj.weight"]
    changed = (w != w0).any(dim=0)  # columns
    assert torch.equal(changed, how.masks(sig)[name])
    half = Neutralizer(model, sig, how)  # same seed, same neutral values
    n.restore()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with neutralized(model, sig, how.replace(strength=0.5)):
        assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(PurifyError, match="strength must be in"):
        half.set_strength(1.5)
    del half


def test_negate_subtracts_alpha_times_the_mean_difference_at_flagged_channels(micro_bed, variants):
    from purifylib.models import resolve
    from purifylib.checkpoints import load_model

    model, _ = load_model(micro_bed.base_dir)
    sig = score(model, variants, include=[0, 2], heads=True, progress=False)
    how = Neutralization(tau=0.25, heads=1, way="negate", alpha=1.5)
    before = _state(model)
    n = Neutralizer(model, sig, how, variants=variants)
    assert torch.equal(_state(model)["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    n.set_strength(1.0)
    name = "blocks.1.mlp.down"  # columns; only variants 0 and 2 (leave-one-out) count
    mean = sum(variants.update(i, "bd").delta(name) - variants.update(i, "clean").delta(name) for i in (0, 2)) / 2
    w, w0 = resolve(model, name).weight.detach(), before["model.layers.1.mlp.down_proj.weight"]
    mask = how.masks(sig)[name]
    torch.testing.assert_close(w[:, mask], w0[:, mask] - 1.5 * mean[:, mask])
    assert torch.equal(w[:, ~mask], w0[:, ~mask])
    n.set_strength(0.5)  # strength scales the step
    torch.testing.assert_close(w[:, mask], w0[:, mask] - 0.75 * mean[:, mask])
    q = resolve(model, "blocks.0.attn.q").weight.detach()  # the flagged head's q rows move too
    assert (q != before["model.layers.0.self_attn.q_proj.weight"]).any()
    n.restore()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # τ = 1 negates every channel: the whole mean difference, as in task-vector negation
    apply(model, sig, how.replace(tau=1.0, heads=0), variants=variants)
    full = sum(variants.update(i, "bd").delta(name) - variants.update(i, "clean").delta(name) for i in (0, 2)) / 2
    torch.testing.assert_close(resolve(model, name).weight.detach(), w0 - 1.5 * full)


def test_negate_needs_variants_full_weights_and_a_sane_alpha(micro_bed, variants):
    from purifylib.checkpoints import load_model

    model, _ = load_model(micro_bed.base_dir)
    sig = score(model, variants, progress=False)
    with pytest.raises(PurifyError, match="alpha must be in"):
        Neutralization(way="negate", alpha=0)
    with pytest.raises(PurifyError, match="way must be one of"):
        Neutralization(way="zero")
    with pytest.raises(PurifyError, match="needs the variants"):
        apply(model, sig, Neutralization(way="negate"))


def test_adapter_neutralization_zeroes_lora_rows_and_columns(micro_bed, variants, tmp_path):
    from purifylib.models import resolve
    from purifylib.checkpoints import load_model, save_model
    from purifylib.train import TrainConfig, finetune

    model, tok = load_model(micro_bed.base_dir)
    res = finetune(model, tok, micro_bed.split("train")[:32],
                   TrainConfig(epochs=1, lr=1e-2, batch_size=16, lora=True, merge=False), progress=False)
    save_model(res.model, tok, tmp_path / "adapter")
    peft_model, _ = load_model(micro_bed.base_dir, adapter=tmp_path / "adapter", merge=False)
    sig = score(peft_model, variants, progress=False)
    how = Neutralization(tau=0.2)
    before = _state(peft_model)
    apply(peft_model, sig, how)
    gate, down = resolve(peft_model, "blocks.0.mlp.gate"), resolve(peft_model, "blocks.0.mlp.down")
    rows = gate.lora_B["default"].weight.detach().abs().sum(dim=1) == 0
    cols = down.lora_A["default"].weight.detach().abs().sum(dim=0) == 0
    masks = how.masks(sig)
    assert torch.equal(rows, masks["blocks.0.mlp.gate"]) and torch.equal(cols, masks["blocks.0.mlp.down"])
    # the frozen base weights are untouched
    assert torch.equal(gate.base_layer.weight, before["base_model.model.model.layers.0.mlp.gate_proj.base_layer.weight"])
    with pytest.raises(PurifyError, match="adapter-only threat"):
        apply(peft_model, sig, how.replace(way="negate"), variants=variants)


def test_neutralization_checks_and_round_trips():
    with pytest.raises(PurifyError, match="tau must be"):
        Neutralization(tau=1.5)
    with pytest.raises(PurifyError, match="strength must be"):
        Neutralization(strength=2)
    with pytest.raises(PurifyError, match="heads must be"):
        Neutralization(heads=-1)
    how = Neutralization(tau=0.2, heads=2, way="negate", alpha=1.25, strength=0.5, seed=7)
    assert Neutralization.from_dict(how.to_dict()) == how
    with pytest.raises(PurifyError, match="unknown neutralization field"):
        Neutralization.from_dict({**how.to_dict(), "neutral": "negate"})
    with pytest.raises(PurifyError, match="layouts do not match"):
        Signature(scores={"blocks.0.mlp.up": torch.zeros(3)}, layouts={})
    with pytest.raises(PurifyError, match="n_variants=11"):
        VariantConfig(n_variants=11)
    with pytest.raises(PurifyError, match="threat"):
        VariantConfig(threat="weights")
