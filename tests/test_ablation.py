import pytest
import torch

from purifylib import PurifyError
from purifylib.ablation import (Probe, ablate_output, activation_sweep, base_weights, mean_outputs,
                                patched_weights, revert, revert_mlp_window, shuffle_mlp, table1, update_norms,
                                window_grid)
from purifylib.attacks import TriggerSpec
from purifylib.models import components, resolve
from purifylib.checkpoints import load_model


@pytest.fixture(scope="module")
def pair(micro_bed, tmp_path_factory):
    """(suspicious model, tokenizer, base weights): the base with a made-up update on every weight."""
    model, tok = load_model(micro_bed.base_dir)
    base = base_weights(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in components(model):
            w = resolve(model, n).weight
            w.add_(0.05 * torch.randn(w.shape, generator=g))
    return model, tok, base


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.slow
def test_every_ablation_restores_the_model_bit_for_bit(pair, micro_bed):
    model, tok, base = pair
    before, hooks = snapshot(model), hook_count(model)
    means = mean_outputs(model, tok, micro_bed.split("defender")[:20])
    contexts = [
        lambda: revert(model, base, attn_layers=None),
        lambda: revert(model, base, mlp_layers=[1]),
        lambda: revert_mlp_window(model, base, 0, 2, with_attn=True),
        lambda: shuffle_mlp(model, base, seed=1),
        lambda: ablate_output(model, 0, "mlp", mode="zero"),
        lambda: ablate_output(model, 1, "attn", mode="mean", means=means),
    ]
    ids = tok("Count the items.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for ctx in contexts:
        with ctx():
            with torch.no_grad():
                changed = model(input_ids=ids).logits
            assert not torch.equal(changed, ref)
        assert same(snapshot(model), before) and hook_count(model) == hooks
    # an exception inside the block still restores
    with pytest.raises(RuntimeError):
        with revert(model, base, mlp_layers=None), ablate_output(model, 0, "attn"):
            raise RuntimeError("boom")
    assert same(snapshot(model), before) and hook_count(model) == hooks


def test_revert_sets_base_weights_only_where_asked(pair):
    model, _, base = pair
    with revert(model, base, mlp_layers=[0]):
        for n in components(model):
            assert torch.equal(resolve(model, n).weight, base[n]) == (n.startswith("blocks.0.mlp"))


def test_shuffle_moves_updates_between_blocks(pair):
    model, _, base = pair
    deltas = {n: resolve(model, n).weight.detach() - base[n] for n in components(model, "mlp")}
    with shuffle_mlp(model, base, seed=0):
        # micro has 2 layers: the only derangement swaps them
        got = resolve(model, "blocks.0.mlp.up").weight - base["blocks.0.mlp.up"]
        assert torch.allclose(got, deltas["blocks.1.mlp.up"], atol=1e-6)


def test_bad_arguments(pair):
    model, _, base = pair
    with pytest.raises(PurifyError, match="does not fit"):
        revert_mlp_window(model, base, 1, 5)
    with pytest.raises(PurifyError, match="unknown ablation mode"):
        ablate_output(model, 0, "mlp", mode="scramble")
    with pytest.raises(PurifyError, match="shape"):
        with patched_weights(model, {"blocks.0.mlp.up": torch.zeros(3, 3)}):
            pass


def test_studies_return_frames(pair, micro_bed):
    model, tok, base = pair
    probe = Probe(model, tok, micro_bed.split("test")[:16], TriggerSpec())
    t1 = table1(probe, base, ks=(1,)).to_frame()
    assert list(t1["condition"])[:3] == ["none", "attn reverted", "mlp reverted"]
    assert t1["asr"].between(0, 1).all()
    grid = window_grid(probe, base)
    assert len(grid) == 3 and set(grid["k"]) == {1, 2}  # 2 layers: windows (0,1), (1,1), (0,2)
    sweep = activation_sweep(probe, mean_outputs(model, tok, micro_bed.split("defender")[:16]))
    assert len(sweep) == 2 * 2 * 2
    norms = update_norms(model, base)
    assert (norms["norm"] > 0).all() and len(norms) == len(components(model))


def test_window_grid_can_be_thinned(micro_bed, micro_model):
    from purifylib.ablation import Probe, base_weights, window_grid
    from purifylib.attacks import TriggerSpec

    model, tok = micro_model
    probe = Probe(model, tok, micro_bed.split("test")[:4], TriggerSpec(), max_new_tokens=2)
    full = window_grid(probe, base_weights(model))
    assert sorted(zip(full["start"], full["k"])) == [(0, 1), (0, 2), (1, 1)]
    thin = window_grid(probe, base_weights(model), ks=[1], stride=2)
    assert sorted(zip(thin["start"], thin["k"])) == [(0, 1), (0, 2)]  # every k=1 start by 2, plus all blocks
    with pytest.raises(PurifyError, match="stride"):
        window_grid(probe, base_weights(model), stride=0)
