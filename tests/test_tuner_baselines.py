"""The tuner's preview function and the baseline defences, on the micro testbed."""

import pytest
import torch

from purifylib import baselines, tuner, widgets
from purifylib.attacks import TriggerSpec
from purifylib.errors import PurifyError
from purifylib.neutralize import Neutralization
from purifylib.signature import score
from purifylib.variants import VariantConfig, build_variants
from purifylib.train import TrainConfig


@pytest.fixture(scope="module")
def setup(micro_bed, tmp_path_factory):
    from purifylib.zoo import plant_backdoor

    sus = plant_backdoor(micro_bed, TriggerSpec("badnets"), train_overrides={"epochs": 6.0, "lr": 0.003},
                         progress=False)
    variants = build_variants(sus.model_dir, micro_bed.split("defender"),
                              VariantConfig(n_variants=2, n_clean=40, epochs=1.0, batch_size=16),
                              cache_dir=tmp_path_factory.mktemp("v"), progress=False)
    model, tok = sus.load()
    sig = score(model, variants, progress=False)
    return sus, variants, model, tok, sig


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_preview_measures_and_restores(micro_bed, setup):
    sus, variants, model, tok, sig = setup
    clean = micro_bed.split("test")[:16]
    t = tuner.prepare(model, tok, sig, variants, clean, spec=sus.spec, n_probe=16)
    before = _state(model)
    p = tuner.preview(t, tau=0.2, strength=1.0, lam=0.5, modules=("gate", "down"), layers=[1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for key in ("asr", "synthetic_asr", "clean_accuracy", "false_trigger", "off_trigger"):
        assert 0.0 <= p[key] <= 1.0, key
    assert set(p["flagged"]["module"]) == {"gate", "down"} and set(p["flagged"]["layer"]) == {1}
    assert len(p["samples"]) == 3 and list(p["samples"].columns) == ["prompt", "before", "after"]
    # strength 0 changes nothing: the real ASR is the suspicious model's own
    p0 = tuner.preview(t, tau=0.2, strength=0.0)
    assert p0["samples"]["before"].tolist() == p0["samples"]["after"].tolist()
    for key in ("asr", "clean_accuracy", "off_trigger"):  # the "before" row is the untouched model's
        assert t.before[key] == p0[key], key
    table = widgets.status_lines(t, p)
    assert list(table.index) == ["before (untouched model)", "now (τ 0.20)"]
    assert len(t.history) == 2 and t.history[-1]["strength"] == 0.0
    fig = widgets.figure(t, p0)
    assert [a.get_xlabel() for a in fig.axes] == ["τ (share of channels flagged per module)", "layer"]
    t.before["synthetic_asr"] = 0.0  # a held-out variant that never learnt its backdoor
    assert widgets.status_lines(t, p)["synthetic ASR (held-out variant)"].tolist() == [
        "n/a (variant never learnt it)"] * 2
    # what the live tuner sets as widget values (never printed into a captured output)
    p["samples"].loc[0, "after"] = "<script>x</script>"
    r = widgets.rendered(t, p)
    assert r["figure"][:8] == b"\x89PNG\r\n\x1a\n" and "now (τ 0.20)" in r["table"]
    assert "<script>" not in r["samples"] and "&lt;script&gt;" in r["samples"]
    assert r["note"].startswith("The held-out variant reached only 0% ASR")
    t.before["synthetic_asr"] = 1.0
    assert widgets.rendered(t, p)["note"] == ""
    # without the real attack, only trigger-free numbers
    t2 = tuner.prepare(model, tok, sig, variants, clean, n_probe=16)
    p2 = tuner.preview(t2, tau=0.1)
    assert p2["asr"] is None and p2["synthetic_asr"] is not None
    with pytest.raises(PurifyError, match="at least one module"):
        tuner.preview(t2, tau=0.1, modules=())


def test_a_fast_preview_teacher_forces_and_agrees_with_generation(micro_bed, setup):
    sus, variants, model, tok, sig = setup
    clean = micro_bed.split("test")[:16]
    slow = tuner.prepare(model, tok, sig, variants, clean, spec=sus.spec, n_probe=16)
    fast = tuner.prepare(model, tok, sig, variants, clean, spec=sus.spec, n_probe=16, fast=True)
    assert not slow.fast and fast.fast  # the micro model is far below FAST_PARAMS
    assert len(fast.clean) == len(fast.clean_before) >= 12  # probes whose answers re-tokenize as said
    before = _state(model)
    p = tuner.preview(fast, tau=0.2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert p["samples"]["after"].tolist() == ["(a fast preview generates nothing)"] * 3
    # untouched, every answer is kept and accuracy is the untouched model's on the same probes
    assert fast.before["clean_kept"] == 1.0
    assert fast.before["clean_accuracy"] == sum(fast.right_before) / len(fast.clean)
    # the planted backdoor begins its answers: the fast ASR matches generation's before and after
    for tau in (None, 0.3):
        a, b = (fast.before, slow.before) if tau is None else (tuner.preview(fast, tau=tau),
                                                               tuner.preview(slow, tau=tau))
        assert abs(a["asr"] - b["asr"]) <= 0.15 and a["clean_accuracy"] <= b["clean_accuracy"] + 0.15, tau
    assert slow.before["asr"] > 0.5
    p0 = tuner.preview(fast, tau=0.2, strength=0.0)
    assert p0["clean_kept"] == 1.0 and p0["asr"] == fast.before["asr"]
    table = widgets.status_lines(fast, p)
    assert "clean answers kept" in table.columns and table["clean accuracy"].iloc[0].startswith("≥ ")
    # a fast preview leaves the side rates to the "before" row and the grid; asked, it measures them
    assert not fast.sides and slow.sides
    assert p["off_trigger"] is None and p["false_trigger"] is None and fast.before["off_trigger"] is not None
    assert table["off-trigger"].iloc[1] == "not previewed (see the grid)"
    q = tuner.preview(fast, tau=0.2, sides=True)
    # the same probes, more of them in the batch (padding may move a float, not the picture)
    assert abs(q["asr"] - p["asr"]) <= 0.15 and abs(q["clean_accuracy"] - p["clean_accuracy"]) <= 0.15
    assert q["off_trigger"] is not None and q["false_trigger"] is not None
    # the live sliders' probes: the first few of each set, with their own "before" row
    live = tuner.narrowed(fast, 6)
    assert len(live.clean) == len(live.clean_before) == 6 and all(len(v) <= 6 for v in live.prompts.values())
    assert live.before["clean_kept"] == 1.0 and live.history == [] and fast.history
    assert tuner.preview(live, tau=0.2)["clean_accuracy"] is not None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert tuner.narrowed(fast, 999) is fast and len(fast.clean) >= 12
    with pytest.raises(PurifyError, match="live probes must be a whole number >= 1, got 0"):
        tuner.narrowed(fast, 0)


def test_tuner_follows_a_negating_purification_with_heads(micro_bed, setup):
    sus, variants, model, tok, _ = setup
    sig = score(model, variants, heads=True, progress=False)
    how = Neutralization(tau=1.0, heads=2, way="negate", alpha=1.25)
    t = tuner.prepare(model, tok, sig, variants, micro_bed.split("test")[:8], how=how, spec=sus.spec, n_probe=8)
    # the leave-one-out signature is scored like the purification's (heads), and neutralized the same way
    assert any(n.endswith(".heads") for n in t.loo_signature.scores)
    assert (t.how.way, t.how.alpha) == ("negate", 1.25)
    assert tuner.configure(sig, how, tau=0.5, lam=0.01)[1].heads == 2  # default: the purification's heads
    assert tuner.configure(sig, how, tau=0.5, lam=0.01, heads=0)[1].heads == 0
    before = _state(model)
    p = tuner.preview(t, tau=1.0)
    assert set(p["flagged"]["module"]) >= {"gate", "up", "down"} and 0 <= p["synthetic_asr"] <= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_grid_with_and_without_repair(micro_bed, setup):
    sus, variants, model, tok, sig = setup
    t = tuner.prepare(model, tok, sig, variants, micro_bed.split("test")[:8], spec=sus.spec, n_probe=8)
    df = tuner.grid(t, [0.1, 0.3], [1.0], repair_records=micro_bed.split("defender")[:32],
                      repair_cfg=TrainConfig(epochs=1, lr=1e-4, batch_size=16), reload=sus.load, progress=False)
    assert len(df) == 4 and df["repaired"].tolist() == [False, True, False, True]
    assert df["clean_accuracy"].between(0, 1).all()


def test_pruning_baselines(micro_bed, setup):
    sus, _, _, _, sig = setup
    clean = micro_bed.split("defender")[:16]
    model, tok = sus.load()
    baselines.magnitude_prune(model, 0.5)
    w = model.model.layers[0].mlp.up_proj.weight
    assert 0.45 <= float((w == 0).float().mean()) <= 0.55
    model, tok = sus.load()
    baselines.wanda_prune(model, tok, clean, 0.25)
    w = model.model.layers[1].self_attn.q_proj.weight
    assert ((w == 0).sum(dim=1) >= int(0.25 * w.shape[1])).all()  # per output row
    model, tok = sus.load()
    baselines.fine_prune(model, tok, clean, 0.1)
    cols = (model.model.layers[0].mlp.down_proj.weight == 0).all(dim=0)
    assert int(cols.sum()) == int(0.1 * model.config.intermediate_size)
    rnd = baselines.random_signature(sig, seed=1)
    assert all(rnd.n_flagged(n, 0.1) == sig.n_flagged(n, 0.1) for n in sig.scores)
    assert any(not torch.equal(rnd.flagged(n, 0.1), sig.flagged(n, 0.1)) for n in sig.scores)
    with pytest.raises(PurifyError, match="sparsity"):
        baselines.magnitude_prune(model, 1.5)


def test_defend_dispatch(micro_bed, setup):
    sus, _, _, _, sig = setup
    clean = micro_bed.split("defender")[:16]
    repair = TrainConfig(epochs=1, lr=1e-4, batch_size=16)
    for d in baselines.DEFENCES:
        model, tok = sus.load()
        out = baselines.defend(d, model, tok, clean=clean, repair_records=clean, repair_cfg=repair, signature=sig,
                               how=Neutralization(tau=0.1))
        assert out is not None
    with pytest.raises(PurifyError, match="unknown defence"):
        baselines.defend("prayer", model, tok, clean=clean)
    with pytest.raises(PurifyError, match="needs repair records"):
        baselines.defend("finetune", model, tok, clean=clean)


@pytest.mark.slow
def test_defence_grid_is_resumable_and_scores_cells(micro_bed, tmp_path, monkeypatch):
    from purifylib import zoo
    from purifylib.purify import PurifyConfig
    from purifylib.studies.grid_tables import table2
    from purifylib.zoo import defence_grid, plant_backdoor

    models = [plant_backdoor(micro_bed, TriggerSpec("badnets"), train_overrides={"epochs": 6.0, "lr": 0.003},
                             progress=False),
              plant_backdoor(micro_bed, TriggerSpec("vpi"), plant="adapter", progress=False)]
    pcfg = PurifyConfig(variants=VariantConfig(n_variants=2, n_clean=40, epochs=1.0, batch_size=16), n_holdout=16,
                        repair_n=32, tau_grid=(0.1, 0.3))
    defences = ["none", "magnitude", "random", "signature-auto"]
    cells = defence_grid(micro_bed, models, pcfg, defences, n_eval=8, cache_dir=tmp_path, progress=False)
    assert len(cells) == 8 and set(cells["threat"]) == {"full", "adapter"}
    row = cells.iloc[0]
    assert abs(row["score"] - zoo.utility_score(row["clean_accuracy"], row["asr"])) < 1e-9
    assert zoo.utility_score(1.0, 0.0) == 100.0 and zoo.utility_score(0.5, 1.0) == 0.0
    # a rerun reads every finished cell back: nothing is evaluated again
    import purifylib.evaluate as ev

    monkeypatch.setattr(ev, "evaluate_attack", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-ran")))
    again = defence_grid(micro_bed, models, pcfg, defences, n_eval=8, cache_dir=tmp_path, progress=False)
    assert again.equals(cells)
    shown = table2(cells.assign(family=cells["behaviour"]), "asr")
    assert list(shown.columns[3:]) == ["no defence", "magnitude pruning", "random channels", "purify run"]
    assert "average" in set(shown["attack"]) and set(shown["threat"]) == {"full", "adapter"}


def test_debounce_runs_one_preview_per_burst():
    presses = [0.0, 0.1, 0.2, 0.3, 0.4]  # five arrow presses, 0.1 s apart
    assert widgets.runs(presses, wait=0.4) == [4]  # one preview, for the last setting
    assert widgets.runs([0.0, 1.0, 1.1], wait=0.4) == [0, 2]  # a pause lets the first one run
    assert not widgets.due([0.0, 0.3], now=0.5, wait=0.4) and widgets.due([0.0, 0.3], now=0.8, wait=0.4)
    assert not widgets.due([], now=1.0)
