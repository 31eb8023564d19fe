"""The purification pipeline and ``purify run`` on the micro testbed."""

import builtins
import json
import pathlib

import pytest
import torch

from purifylib.cli import main
from purifylib.errors import PurifyError
from purifylib.defender import split_clean
from purifylib.purify import PurifyConfig, purify
from purifylib.recipe import NEGATE_TAU_GRID, TAU_GRID
from purifylib.variants import VariantConfig, build_variants, carrying

from conftest import tree_hash

QUICK = dict(variants=VariantConfig(n_variants=2, n_clean=40, epochs=1.0, batch_size=16), n_holdout=24,
             repair_n=48, tau_grid=(0.05, 0.3))


@pytest.fixture(scope="module")
def suspicious(micro_bed):
    from purifylib.attacks import TriggerSpec
    from purifylib.zoo import plant_backdoor

    return plant_backdoor(micro_bed, TriggerSpec("badnets"), train_overrides={"epochs": 6.0, "lr": 0.003},
                          progress=False)


def test_split_is_disjoint_seeded_and_shrinks_to_fit(micro_bed):
    clean = micro_bed.split("defender")
    cfg = PurifyConfig(variants=VariantConfig(n_variants=3, n_clean=500), n_holdout=100, repair_n=50)
    split, used = split_clean(clean, cfg)
    assert used.variants.n_clean == (len(clean) - 100) // 3
    key = lambda r: (r["instruction"], r["input"])  # noqa: E731
    assert not {key(r) for r in split.holdout} & {key(r) for r in split.variants + split.repair}
    assert split_clean(clean, cfg)[0].holdout == split.holdout
    assert split_clean(clean, PurifyConfig(variants=VariantConfig(n_variants=3), n_holdout=100, seed=1))[0].holdout != split.holdout
    with pytest.raises(PurifyError, match="the clean data has 20 records"):
        split_clean(clean[:20], cfg)


def test_config_validation():
    with pytest.raises(PurifyError, match="tau must be a fraction"):
        PurifyConfig(tau=1.5)
    with pytest.raises(PurifyError, match="tau must be a fraction"):
        PurifyConfig(tau="often")
    with pytest.raises(PurifyError, match="leave-one-out"):
        PurifyConfig(variants=VariantConfig(n_variants=1))
    assert PurifyConfig(tau="0.2").tau == 0.2
    assert PurifyConfig(variants={"n_variants": 3}).variants.n_variants == 3
    # negate reaches every channel: the default grid becomes NEGATE_TAU_GRID, a given grid stays
    assert PurifyConfig(neutral="negate").tau_grid == NEGATE_TAU_GRID and max(NEGATE_TAU_GRID) == 1.0
    assert PurifyConfig(neutral="negate", tau_grid=(0.2, 0.1)).tau_grid == (0.1, 0.2)
    assert PurifyConfig(neutral="negate", tau_grid=TAU_GRID).tau_grid == TAU_GRID  # asked for: kept
    assert PurifyConfig().neutralization(0.2).to_dict() == {"tau": 0.2, "heads": 0, "way": "reinit", "alpha": 1.0,
                                                            "strength": 1.0, "seed": 0}
    with pytest.raises(PurifyError, match="prefer must be one of"):
        PurifyConfig(prefer="speed")
    with pytest.raises(PurifyError, match="way must be one of"):
        PurifyConfig(neutral="zero")
    with pytest.raises(PurifyError, match="alpha must be in"):
        PurifyConfig(neutral="negate", alpha=-1)
    with pytest.raises(PurifyError, match="adapter-only threat needs 'reinit'"):
        PurifyConfig(neutral="negate", variants=VariantConfig(threat="adapter"))


def test_carrying_a_variant_restores_the_model(micro_bed, suspicious, tmp_path):
    from purifylib.purify import probe_asr

    clean = micro_bed.split("defender")
    variants = build_variants(suspicious.model_dir, clean, QUICK["variants"], cache_dir=tmp_path, progress=False)
    model, tok = suspicious.load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with carrying(model, variants, 1):
        assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        plant = variants.config.plant(1)
        probe_asr(model, tok, clean[-8:], plant.trigger, plant.behaviour, kind=plant.kind)
        carried = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # in memory (the tuner's): the same update, read from disk once
    kept = variants.memoized()
    name = kept.modules[0]
    for _ in range(2):
        with carrying(model, kept, 1):
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in carried.items())
    assert torch.equal(kept.mean_delta(name), variants.mean_delta(name)) and kept.mean_delta(name) is kept.mean_delta(name)
    assert kept.update(1, "bd")._kept and not hasattr(variants.update(1, "bd"), "_kept")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_purify_reads_no_attack_description(micro_bed, suspicious, tmp_path, monkeypatch):
    real_open, real_read = builtins.open, pathlib.Path.read_text

    def guarded_open(file, *a, **kw):
        if str(file).endswith("attack.json"):
            raise AssertionError(f"the purification path opened {file}")
        return real_open(file, *a, **kw)

    def guarded_read(self, *a, **kw):
        if self.name == "attack.json":
            raise AssertionError(f"the purification path read {self}")
        return real_read(self, *a, **kw)

    assert (suspicious.model_dir / "attack.json").is_file()
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(pathlib.Path, "read_text", guarded_read)
    res = purify(suspicious.model_dir, micro_bed.split("defender"), PurifyConfig(**QUICK), cache_dir=tmp_path,
                 progress=False)
    assert res.tau in QUICK["tau_grid"]
    assert res.folds and {"tau", "fold", "trigger", "asr"} <= set(res.folds[0])
    # τ rule: every smaller τ failed some fold; the chosen one passed every fold (unless none did)
    assert [r["tau"] for r in res.folds[:2]] == [0.0, 0.0]  # each held-out backdoor before neutralization
    tried = [r for r in res.folds if r["tau"] > 0]
    passed = {r["tau"] for r in tried} - {r["tau"] for r in tried if r["asr"] > 0.05}
    if not res.notes:
        assert max(r["tau"] for r in tried) == res.tau and res.tau in passed
    d = res.to_dict()
    assert d["cost"]["fine_tunes"] >= 2 * 2 + 1 and d["signature"]


@pytest.mark.slow
def test_the_tau_rule_prefers_removal_over_utility(micro_bed, suspicious, tmp_path):
    """A bound no τ can meet: the removing τ is kept (and the report says what it costs), not a smaller one."""
    cfg = PurifyConfig(**{**QUICK, "acc_keep": 2.0, "prefer": "removal"})  # twice the accuracy: never held
    res = purify(suspicious.model_dir, micro_bed.split("defender"), cfg, cache_dir=tmp_path, progress=False)
    tried = [r for r in res.folds if r["tau"] > 0]
    floor = min((t for t in QUICK["tau_grid"] if not any(r["asr"] > 0.05 for r in tried if r["tau"] == t)
                 and any(r["tau"] == t for r in tried)), default=QUICK["tau_grid"][-1])
    assert res.tau == floor == res.floor and len(res.tau_trials) == 1 and not res.tau_trials[0]["holds"]
    assert res.rule_summary()["trials"] == f"{floor:g}:fails" and res.to_dict()["tau_floor"] == floor
    assert any("costs utility" in n for n in res.notes)
    lenient = purify(suspicious.model_dir, micro_bed.split("defender"),
                     PurifyConfig(**{**QUICK, "acc_keep": 2.0, "prefer": "utility"}), cache_dir=tmp_path,
                     progress=False)  # utility first
    assert lenient.tau <= res.tau and len(lenient.tau_trials) == 1 + sum(t < res.tau for t in QUICK["tau_grid"])


@pytest.mark.parametrize("neutral", ["reinit", "negate"])
def test_fixed_tau_skips_leave_one_out(micro_bed, suspicious, tmp_path, neutral):
    # (the negating run also distils its repair from the untouched model)
    res = purify(suspicious.model_dir, micro_bed.split("defender"), PurifyConfig(**{
        **QUICK, "tau": 0.1, "neutral": neutral, "repair_distill": float(neutral == "negate")}),
                 cache_dir=tmp_path, progress=False)
    assert res.tau == 0.1 and res.folds == [] and len(res.tau_trials) == 1
    assert res.to_dict()["config"]["repair_distill"] == float(neutral == "negate")
    assert res.neutralization.way == neutral and res.to_dict()["config"]["neutral"] == neutral
    assert res.to_dict()["neutralization"] == res.neutralization.to_dict()


@pytest.mark.slow
def test_purify_run_cli(capsys, micro_bed, suspicious, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "purified"
    before = tree_hash(suspicious.model_dir)
    code = main(["--quiet", "run", "--model", str(suspicious.model_dir), "--clean-data",
                 str(micro_bed.data_dir / "defender.json"), "--out", str(out), "--variants", "2", "--tau", "0.1",
                 "--cache", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tau 0.1" in captured.out
    assert "fragility: re-initialising 5% random MLP channels multiplies held-out perplexity by 1." in captured.out
    assert "the configured recipe ran (reinit)" in captured.out
    assert tree_hash(suspicious.model_dir) == before  # the input is never written to
    report = json.loads((out / "purify_report.json").read_text())
    assert report["inputs"]["clean_records"] == len(micro_bed.split("defender"))
    assert len(report["inputs"]["model_sha256"]) == 64 and report["versions"]["torch"]
    assert {"suspicious", "purified"} <= set(report["metrics"]) and report["timings"]["total"] > 0
    assert {"layer", "module", "flagged"} <= set(report["signature"][0])
    assert "attack" not in json.dumps(report["config"])
    AutoModelForCausalLM.from_pretrained(out / "model")  # an ordinary checkpoint
    assert (out / "signature" / "scores.safetensors").is_file()
    assert not list(tmp_path.glob(".purified*"))
    assert len(report["samples"]) == 4 and all({"suspicious", "purified"} <= set(r) for r in report["samples"])
    assert main(["--quiet", "report", str(out)]) == 0  # the run's page
    assert report["samples"][0]["instruction"] in (out / "report.html").read_text().replace("&#x27;", "'")


@pytest.mark.parametrize("argv, needle", [
    (["--tau", "2"], "tau must be a fraction"),
    (["--tau", "lots"], "--tau: expected a number or 'auto'"),
    (["--threat", "adapter"], "--threat adapter needs --adapter"),
    (["--variants", "1"], "needs at least 2 variants"),
    (["--neutral", "negate", "--alpha", "0"], "alpha must be in"),
])
def test_purify_run_bad_input(capsys, micro_bed, suspicious, tmp_path, argv, needle):
    out = tmp_path / "out"
    code = main(["run", "--model", str(suspicious.model_dir), "--clean-data", str(micro_bed.data_dir / "defender.json"),
                 "--out", str(out), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_purify_run_refuses_a_non_empty_output(capsys, micro_bed, suspicious, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code = main(["run", "--model", str(suspicious.model_dir), "--clean-data", str(micro_bed.data_dir / "defender.json"),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "not empty" in capsys.readouterr().err


def test_adapter_threat_purifies_the_adapter(micro_bed, tmp_path):
    from purifylib.checkpoints import load_model, save_model
    from purifylib.train import TrainConfig, finetune

    model, tok = load_model(micro_bed.base_dir)
    res = finetune(model, tok, micro_bed.split("train")[:64],
                   TrainConfig(epochs=1, lr=1e-2, batch_size=16, lora=True, merge=False), progress=False)
    save_model(res.model, tok, tmp_path / "adapter")
    cfg = PurifyConfig(**{**QUICK, "variants": VariantConfig(n_variants=2, n_clean=40, epochs=1.0, batch_size=16,
                                                             threat="adapter")})
    out = purify(micro_bed.base_dir, micro_bed.split("defender"), cfg, adapter_dir=tmp_path / "adapter",
                 cache_dir=tmp_path / "cache", progress=False)
    assert hasattr(out.model, "peft_config")  # still an adapter, repaired in place
    assert out.variants.update(0, "bd").is_lora


def test_run_config_reads_a_recipe_and_flags_win(tmp_path):
    """Every PurifyConfig field can be set: a YAML recipe for all, flags for the common ones (they win)."""
    import argparse

    from purifylib.cli import build_parser
    from purifylib.commands import run_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("tau: 0.2\nheads: 3\nneutral: negate\nalpha: 1.25\nlam: 0.05\nrepair_n: 500\n"
                      "variants: {n_variants: 4, lora: true, variants: diverse}\n")
    argv = ["run", "--model", "m", "--clean-data", "c", "--out", "o", "--config", str(recipe)]
    a = build_parser().parse_args(argv + ["--heads", "5", "--seed", "2", "--fragile-ppl", "0", "--repair-distill", "0.5"])
    cfg = run_config(a)
    assert cfg.fragile_ppl == 0 and cfg.repair_distill == 0.5
    assert (cfg.tau, cfg.heads, cfg.neutral, cfg.alpha, cfg.lam, cfg.repair_n, cfg.seed) == (0.2, 5, "negate", 1.25,
                                                                                                 0.05, 500, 2)
    assert cfg.variants.n_variants == 4 and cfg.variants.lora and cfg.variants.seed == 2
    assert cfg.variants.plant(1).kind == "prefix" and cfg.variants.folds() == [[0], [1], [2], [3]]
    assert not cfg.pretrained_lora  # the recipe says how the variants train: a pretrained model keeps that
    plain = run_config(build_parser().parse_args(argv[:7]))
    assert plain == PurifyConfig()  # no recipe, no flags: purify run's defaults are PurifyConfig's
    assert not run_config(build_parser().parse_args(argv[:7] + ["--no-variant-lora"])).pretrained_lora
    assert run_config(build_parser().parse_args(argv[:7] + ["--variants", "4"])).pretrained_lora
    for text, needle in (("tau: [1, 2\n", "not valid YAML"), ("- 1\n", "expected a mapping"),
                         ("taus: 0.1\n", r"unknown setting\(s\) taus"), ("variants: {epoch: 2}\n", "variants: unknown")):
        recipe.write_text(text)
        with pytest.raises(PurifyError, match=needle):
            run_config(build_parser().parse_args(argv))
    assert isinstance(a, argparse.Namespace)


def test_a_later_setting_at_its_old_value_keeps_cached_results_valid():
    first = PurifyConfig().held_at_first_values(repair=True)  # the settings the committed grid was keyed with
    old = first.to_dict()
    for later in ("prefer", "repair_triggers", "learnt_asr", "fragile_ppl", "pretrained_lora", "repair_distill"):
        old.pop(later)  # the configuration as it was when the committed grid was keyed
    assert first.identity() == old
    assert PurifyConfig(prefer="removal").identity()["prefer"] == "removal"
    assert PurifyConfig(repair_triggers=0.25).identity()["repair_triggers"] == 0.25
    assert PurifyConfig(repair_distill=1.0).identity()["repair_distill"] == 1.0
    assert PurifyConfig(repair_distill=1.0).baseline_identity(repair=False) == PurifyConfig().baseline_identity(False)


def test_a_distilling_repair_reads_the_untouched_model_on_the_records_without_triggers(micro_bed):
    cfg = PurifyConfig(**{**QUICK, "repair_triggers": 0.5, "repair_distill": 0.75})
    split, cfg = split_clean(micro_bed.split("defender"), cfg)
    loads = []
    teacher = cfg.repair_teacher(lambda: loads.append(1) or ("model", "tok"), split)
    assert teacher == {"teacher": "model", "teacher_records": split.clean_repair, "distill": 0.75} and loads == [1]
    assert PurifyConfig().repair_teacher(lambda: pytest.fail("loaded"), split) is None
    with pytest.raises(PurifyError, match="repair_distill must be a share"):
        PurifyConfig(repair_distill=-0.5)


def test_repair_can_carry_the_variants_own_triggers(micro_bed):
    cfg = PurifyConfig(**{**QUICK, "repair_triggers": 0.5, "variants": VariantConfig(
        n_variants=3, n_clean=40, variants="diverse")})
    split, cfg = split_clean(micro_bed.split("defender"), cfg)
    changed = [(a, b) for a, b in zip(split.clean_repair, split.repair) if a != b]
    assert 0.3 * len(split.repair) < len(changed) < 0.7 * len(split.repair)
    assert all(a["output"] == b["output"] and a["input"] == b["input"] for a, b in changed)  # answers kept
    triggers = [p.trigger for p in cfg.variants.plants]
    assert all(any(t in b["instruction"] for t in triggers) for _, b in changed)
    assert split_clean(micro_bed.split("defender"), cfg)[0].repair == split.repair  # seeded
    plain, _ = split_clean(micro_bed.split("defender"), PurifyConfig(**{**QUICK, "repair_triggers": 0.0}))
    assert plain.repair is plain.clean_repair  # none triggered: the records as they are
    assert "repair_triggers" not in PurifyConfig(**{**QUICK, "repair_triggers": 0.0}).identity()  # keys as before
    with pytest.raises(PurifyError, match="repair_triggers must be a share"):
        PurifyConfig(repair_triggers=1.5)


def test_variants_train_as_long_as_their_threat_needs():
    from purifylib.zoo import variants_for

    full, adapter = VariantConfig(), VariantConfig(threat="adapter")
    # full fine-tunes 8 epochs (3 left the advert and code variants at 0% on the dev cells), LoRA on the adapter 3
    assert (full.lora, full.lr, full.epochs) == (False, 1e-3, 8.0)
    assert (adapter.lora, adapter.lr, adapter.epochs) == (True, 1e-2, 3.0)
    assert variants_for(full, "adapter") == adapter and variants_for(adapter, "full") == full
    assert VariantConfig(epochs=2.0).epochs == 2.0 and VariantConfig(threat="adapter", epochs=5.0).epochs == 5.0
    with pytest.raises(PurifyError, match="epochs"):
        VariantConfig(epochs=0.0)


def test_a_change_to_the_method_keeps_the_baselines_keys():
    base = PurifyConfig().held_at_first_values(repair=True)
    changed = PurifyConfig(prefer="removal", repair_triggers=0.25, heads=1, tau_grid=(0.1, 0.2),
                           variants=VariantConfig(variants="diverse", epochs=5.0))
    assert base.baseline_identity() == base.identity()  # the committed grid's cells keep their keys
    assert changed.baseline_identity(repair=False) == base.identity() != changed.identity()
    for split in (dict(repair_n=100), dict(n_holdout=50), dict(variants=VariantConfig(n_clean=100))):
        assert PurifyConfig(**split).baseline_identity(repair=False) != base.identity()
    assert PurifyConfig().baseline_identity(repair=False) == base.identity()  # whatever purify run's defaults are
    # a baseline that repairs follows the repair's settings; one that does not, ignores them
    longer = PurifyConfig(repair_epochs=2.0)
    assert longer.baseline_identity(repair=True) != base.identity() == longer.baseline_identity(repair=False)
    assert longer.paper_recipe(0.03).repair_epochs == 1.0 and longer.paper_recipe(0.03).variants.variants == \
        VariantConfig(variants="paper").variants


def test_fragility_is_measured_and_leaves_the_model_as_it_was(micro_bed, suspicious):
    from purifylib.purify import fragility

    model, tok = suspicious.load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ratio = fragility(model, tok, micro_bed.split("defender")[:24], seed=0)
    assert 1.0 < ratio < 2.0  # a model trained from scratch: 5% random channels barely move it
    assert ratio == fragility(model, tok, micro_bed.split("defender")[:24], seed=0)  # seeded
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_fragile_model_gets_the_pretrained_recipe(micro_bed, suspicious, monkeypatch):
    import purifylib.purify as pp

    model, tok = suspicious.load()
    records = micro_bed.split("defender")[:8]
    monkeypatch.setattr(pp, "fragility", lambda *a, **k: 7.3)  # SmolLM2's measured factor
    notes = []
    cfg, ratio, recipe = pp.choose_recipe(PurifyConfig(), model, tok, records, notes)
    n_heads = model.config.num_attention_heads
    assert (recipe, ratio, cfg.neutral, cfg.alpha, cfg.heads, cfg.repair_lr, cfg.tau_grid) == \
        ("pretrained", 7.3, "negate", 5.0, n_heads, 1e-4, NEGATE_TAU_GRID)
    # the repair's epochs and the floor at the values the pretrained recipe was measured with, not the testbed's
    assert "7.30 (> 2)" in notes[0] and (cfg.repair_epochs, cfg.loo_asr_max) == (2.0, 0.05) != \
        (PurifyConfig().repair_epochs, PurifyConfig().loo_asr_max)
    # a repair or floor the user set is kept; the switch itself (negation, heads) is not negotiable
    said = []
    given = pp.choose_recipe(PurifyConfig(repair_epochs=5.0, repair_lr=2e-5, loo_asr_max=0.1), model, tok, records,
                             said)[0]
    assert (given.repair_epochs, given.repair_lr, given.loo_asr_max, given.neutral) == (5.0, 2e-5, 0.1, "negate")
    # the note says what runs: the recipe's values, or the user's where kept
    assert "repair lr 0.0001 for 2 epochs, floor 0.05" in notes[0] and "repair lr 2e-05 for 5 epochs, floor 0.1" in said[0]
    # and LoRA variants, unless told to keep full ones
    assert (cfg.variants.lora, cfg.variants.lr, cfg.variants.epochs) == (True, 5e-3, 2.0) and "LoRA" in notes[0]
    kept = pp.choose_recipe(PurifyConfig(pretrained_lora=False), model, tok, records, [])[0]
    assert kept.variants == PurifyConfig().variants and kept.neutral == "negate"
    # what the user chose is kept: negation already, the check off, or the adapter-only threat
    for given in (PurifyConfig(neutral="negate", alpha=2.0), PurifyConfig(fragile_ppl=0),
                  PurifyConfig(fragile_ppl=10.0)):
        assert pp.choose_recipe(given, model, tok, records, [])[::2] == (given, "configured")
    adapter = PurifyConfig(variants=VariantConfig(threat="adapter"))
    assert pp.choose_recipe(adapter, model, tok, records, []) == (adapter, None, "configured")
    monkeypatch.setattr(pp, "fragility", lambda *a, **k: 1.07)  # the testbed's
    assert pp.choose_recipe(PurifyConfig(), model, tok, records, [])[::2] == (PurifyConfig(), "configured")
    # the paper's recipe re-initialises whatever the model; the check keeps every committed key
    assert PurifyConfig().paper_recipe(0.03).fragile_ppl == 0 and "fragile_ppl" not in PurifyConfig().identity()
    assert PurifyConfig(fragile_ppl=3.0).identity()["fragile_ppl"] == 3.0
    assert "pretrained_lora" not in PurifyConfig().identity()
    assert PurifyConfig(pretrained_lora=False).identity()["pretrained_lora"] is False
    # a baseline does not read it: its cells keep their keys
    assert PurifyConfig(pretrained_lora=False).baseline_identity() == PurifyConfig().baseline_identity()
    for bad in (0.5, 1.0, float("nan")):
        with pytest.raises(PurifyError, match="fragile_ppl must be 0"):
            PurifyConfig(fragile_ppl=bad)


def test_purify_reports_the_recipe_it_ran(micro_bed, suspicious, tmp_path, monkeypatch):
    import purifylib.purify as pp

    monkeypatch.setattr(pp, "fragility", lambda *a, **k: 9.0)
    res = purify(suspicious.model_dir, micro_bed.split("defender"), PurifyConfig(**{**QUICK, "tau": 0.1}),
                 cache_dir=tmp_path, progress=False)
    assert res.recipe == "pretrained" and res.neutralization.way == "negate" and res.fragility == 9.0
    assert res.to_dict()["fragility"] == {"perplexity_factor": 9.0, "threshold": 2.0, "tau": 0.05,
                                          "recipe": "pretrained"}
    assert res.ran(PurifyConfig(**QUICK)).neutral == "negate"
    assert res.rule_summary()["fragility"] == 9.0 and res.rule_summary()["recipe"] == "pretrained"


def test_only_variants_that_learnt_their_backdoor_count():
    from purifylib.purify import learnt_variants

    notes = []
    assert learnt_variants([1.0, 0.95, 0.2], [[0], [1], [2]], 0.0, notes) == [0, 1, 2] and not notes
    assert learnt_variants([1.0, 0.95, 0.2], [[0], [1], [2]], 0.9, notes) == [0, 1]
    assert "variant 2 20%" in notes[-1]
    # one fold left would leave leave-one-out nothing to hold out: every variant counts, and it says so
    assert learnt_variants([1.0, 0.95, 0.2], [[0, 1], [2]], 0.9, notes) == [0, 1, 2]
    assert "fewer than two folds" in notes[-1]
    with pytest.raises(PurifyError, match="learnt_asr must be a share"):
        PurifyConfig(learnt_asr=2.0)


def test_small_clean_data_holds_out_at_most_a_fifth(micro_bed):
    from purifylib.defender import HOLDOUT_SHARE, holdout_size

    assert holdout_size(3600, 200) == 200 and holdout_size(300, 200) == 60 and holdout_size(300, 40) == 40
    clean = micro_bed.split("defender")[:300]
    split, used = split_clean(clean, PurifyConfig())  # a few hundred records, purify run's defaults
    assert len(split.holdout) == used.n_holdout == int(300 * HOLDOUT_SHARE)
    assert used.variants.n_clean == (300 - 60) // 6 == 40  # not the 16 that 200 held out would leave
    again, same = split_clean(clean, used)  # the returned config splits the same way again
    assert again.holdout == split.holdout and same == used
