"""Notebook 02: the backdoor signature, layer by layer (the paper's Finding 2).

``run`` purifies every suspicious model of the zoo as ``purify run`` would, then, on the first one,
measures how consistent the variants are, whether the signature finds the channels the real
backdoor wrote (ground truth only the testbed has), what each change to the paper's recipe does,
and the effect of N; ``findings`` states what holds, by :data:`purifylib.studies.findings.THRESHOLDS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from purifylib.studies.findings import THRESHOLDS, Finding

SETTINGS_COLUMNS = ["setting", "tau", "asr", "off_trigger", "clean_accuracy", "perplexity"]
N_COLUMNS = ["n_variants", "tau", "asr", "clean_accuracy", "off_trigger", "perplexity"]


@dataclass
class SignatureStudy:
    config: object  # purifylib.zoo.ZooConfig
    purify_config: object
    purified: object  # purifylib.zoo.PurifyStudy: before/after of every model, and its runs
    focus: object  # the first suspicious model: the one whose signature is studied
    consistency: object  # DataFrame: mean pairwise cosine of the variants' Δ per layer and module
    overlap: object  # DataFrame: signature (and random) precision against the real update's channels
    overlap_tau: float
    settings: object  # DataFrame: each change to the paper's recipe
    n_curve: object  # DataFrame: the effect of N
    ablations: bool

    def to_frame(self):
        return self.purified.to_frame()

    @property
    def run(self):
        """The focus model's purification (:class:`~purifylib.purify.PurifyResult`)."""
        return self.purified.runs[self.focus.name]

    def overlap_by_source(self):
        return self.overlap.groupby("source")[["precision", "spearman"]].mean()


def settings_for(tau: float, pcfg, *, paper_repair_n: int, seed: int) -> dict:
    """The settings table's rows: the paper's recipe piece by piece, and this method's, at one split."""
    from purifylib.train import TrainConfig

    paper_repair = TrainConfig(epochs=5, lr=1e-4, batch_size=32, seed=seed)
    repair = pcfg.repair_config()
    return {
        "suspicious (no defence)": {"tau": 0.0, "repair": None},
        "repair only": {"tau": 0.0, "repair": repair},
        "paper: tau 3%, paper repair": {"tau": 0.03, "repair": paper_repair, "repair_n": paper_repair_n},
        "tau 3%, this repair": {"tau": 0.03, "repair": repair},
        f"random channels, tau {tau:g}, this repair": {"tau": tau, "repair": repair, "random": True},
        f"signature, tau {tau:g} (auto), no repair": {"tau": tau, "repair": None},
        f"signature, tau {tau:g} (auto), this repair": {"tau": tau, "repair": repair},
    }


def n_subsets(ns, draws: int, seed: int) -> list[tuple[int, list[int]]]:
    """``(n, variants)`` for the effect of N: the first ``n`` with one draw, else ``draws`` seeded
    subsets of ``n`` of the ``max(ns)`` variants (the largest ``n`` has one subset: all of them)."""
    import random

    rng = random.Random(seed)
    top = max(ns)
    return [(n, sorted(rng.sample(range(top), n)) if draws > 1 and n < top else list(range(n)))
            for n in ns for _ in range(draws if n < top else 1)]


def n_sweep(bed, sus, cfg, ns, *, tau: float, n_eval: int, seed: int = 0, progress: bool = True, draws: int = 1):
    """ASR and accuracy after purification with ``n`` variants, for each ``n`` in ``ns`` (τ fixed:
    leave-one-out needs two variants). The variants of the largest ``n`` serve all: with ``draws`` 1
    the first ``n``; with more, ``draws`` seeded subsets of ``n`` of them (one for the largest), and
    each metric's mean with a 95% half-width over the subsets (``<metric>_ci``)."""
    import pandas as pd
    from purifylib.progress import bar as tqdm
    from purifylib.stats import t_interval

    from purifylib.evaluate import evaluate_attack
    from purifylib.neutralize import neutralize_and_repair
    from purifylib.defender import split_clean
    from purifylib.signature import score
    from purifylib.variants import build_variants
    from purifylib.zoo import defender_records, eval_kwargs

    big = dataclasses.replace(cfg, tau=tau, variants=dataclasses.replace(cfg.variants, n_variants=max(ns)))
    split, big = split_clean(defender_records(bed, sus, progress), big)
    variants = build_variants(sus.model_dir, split.variants, big.variants, progress=progress)
    test, kw = bed.split("test")[:n_eval], eval_kwargs(bed)
    rows = []
    for n, include in tqdm(n_subsets(ns, draws, seed), desc="effect of N", disable=not progress):
        model, tok = sus.load()
        sig = score(model, variants, lam=cfg.lam, include=include, progress=False)
        model = neutralize_and_repair(model, tok, sig, dataclasses.replace(cfg.neutralization(tau), heads=0),
                                      variants=variants, repair_records=split.repair, repair_cfg=cfg.repair_config())
        m = evaluate_attack(model, tok, test, sus.spec, seed=seed, **kw)
        rows.append({"n_variants": n, "tau": tau, "variants": " ".join(map(str, include)), "asr": m.asr,
                     "clean_accuracy": m.clean_accuracy, "off_trigger": m.off_trigger, "perplexity": m.perplexity})
    frame = pd.DataFrame(rows)
    if draws <= 1:
        return frame.drop(columns="variants")
    out = []
    for n, g in frame.groupby("n_variants", sort=True):
        row = {"n_variants": n, "tau": tau, "draws": len(g)}
        for k in ("asr", "clean_accuracy", "off_trigger", "perplexity"):
            row[k], half = t_interval(g[k])
            row[f"{k}_ci"] = 0.0 if half != half else half  # one draw: no interval
        out.append(row)
    return pd.DataFrame(out)


def compare_settings(bed, sus, signature, cfg, settings: dict, *, n_eval: int, seed: int = 0,
                     progress: bool = True, split=None, variants=None):
    """Neutralize-and-repair ``sus`` under named settings and measure each against the real attack.

    ``settings`` maps a label to a dict with ``tau`` (0: no neutralization), ``repair`` (a
    :class:`~purifylib.train.TrainConfig`, or None for none) and optionally ``random: True`` (the
    control: as many channels per module, chosen at random). Same signature, same data split
    (``split``: the purification's own, :attr:`~purifylib.purify.PurifyResult.split`; else computed).
    Each setting neutralizes as ``cfg`` does at its τ (``variants``: the scored ones, for negation).
    """
    import pandas as pd
    from purifylib.progress import bar as tqdm

    from purifylib.baselines import random_signature
    from purifylib.evaluate import evaluate_attack
    from purifylib.neutralize import neutralize_and_repair
    from purifylib.defender import split_clean
    from purifylib.zoo import defender_records, eval_kwargs

    if split is None:
        split, _ = split_clean(defender_records(bed, sus, progress), cfg)
    test, kw = bed.split("test")[:n_eval], eval_kwargs(bed)
    rows = []
    for label, s in tqdm(settings.items(), desc="settings", disable=not progress):
        model, tok = sus.load(merge=sus.adapter_dir is None)
        sig = random_signature(signature, seed) if s.get("random") else signature
        model = neutralize_and_repair(model, tok, sig if s["tau"] > 0 else None, cfg.neutralization(s["tau"]),
                                      variants=variants, repair_records=split.repair[:s.get("repair_n", len(split.repair))],
                                      repair_cfg=s.get("repair"))
        m = evaluate_attack(model, tok, test, sus.spec, seed=seed, **kw)
        rows.append({"setting": label, "tau": s["tau"], "asr": m.asr, "off_trigger": m.off_trigger,
                     "clean_accuracy": m.clean_accuracy, "perplexity": m.perplexity})
    return pd.DataFrame(rows)


def run(zoo_config, purify_config, *, plant_overrides: dict | None = None, ns=(1, 6), paper_repair_n: int = 200,
        ablations: bool = True, progress: bool = True, n_draws: int = 1) -> SignatureStudy:
    import pandas as pd

    from purifylib.ablation import base_weights, signature_overlap
    from purifylib.checkpoints import load_model
    from purifylib.signature import variant_consistency
    from purifylib.zoo import plant_backdoor, purify_zoo

    zcfg, pcfg = zoo_config, purify_config
    bed = zcfg.build_bed(progress=progress)
    suspicious = [plant_backdoor(bed, spec, plant=plant, rate=zcfg.poison_rate, seed=zcfg.seed,
                                 train_overrides=plant_overrides or None, progress=progress)
                  for spec, plant in zcfg.specs()]
    purified = purify_zoo(bed, suspicious, pcfg, n_eval=zcfg.n_eval, seed=zcfg.seed, progress=progress)
    focus = suspicious[0]
    run_ = purified.runs[focus.name]
    pcfg = run_.ran(pcfg)  # a pretrained model's run switches recipe: later steps neutralize and repair as it did
    model, _ = focus.load(merge=focus.adapter_dir is None)
    consistency = variant_consistency(model, run_.variants) if pcfg.variants.n_variants > 1 else pd.DataFrame()
    sig = run_.signature
    ov_tau = run_.tau if run_.tau < THRESHOLDS["overlap_tau_max"] else THRESHOLDS["overlap_tau"]
    overlap = signature_overlap(sig, model, base_weights(load_model(bed.base_dir)[0]), tau=ov_tau, seed=zcfg.seed)
    if ablations:
        settings = compare_settings(bed, focus, sig, pcfg, settings_for(run_.tau, pcfg, paper_repair_n=paper_repair_n,
                                                                         seed=zcfg.seed),
                                    n_eval=zcfg.n_eval, seed=zcfg.seed, progress=progress, split=run_.split,
                                    variants=run_.variants)
        n_curve = n_sweep(bed, focus, pcfg, ns, tau=run_.tau, n_eval=zcfg.n_eval, seed=zcfg.seed, progress=progress,
                          draws=n_draws)
    else:
        settings, n_curve = pd.DataFrame(columns=SETTINGS_COLUMNS), pd.DataFrame(columns=N_COLUMNS)
    return SignatureStudy(zcfg, pcfg, purified, focus, consistency, overlap, ov_tau, settings, n_curve, ablations)


def findings(study: SignatureStudy) -> list[Finding]:
    t, pcfg, results = THRESHOLDS, study.purify_config, study.to_frame()
    out = [Finding(f"Neutralization: **{pcfg.neutral}**" + (
        f" (alpha {pcfg.alpha:g}: each flagged channel loses alpha × the variants' mean difference Δ; the paper "
        "re-initialises them)." if pcfg.neutral == "negate" else " (the paper's: the flagged channels are re-initialised)."))]
    avg = results["asr_after"].mean()
    out.append(Finding(f"Average ASR after purification over {len(results)} model(s): {avg:.1%} (before: "
                       f"{results['asr_before'].mean():.1%}); target ≤ {t['purified_asr_max']:.0%}.",
                       bool(avg <= t["purified_asr_max"])))
    for r in results.itertuples():
        if study.config.model is None:  # the testbed's targets
            ok = (r.asr_after <= t["purified_asr_max"] and r.accuracy_kept >= t["purified_accuracy_kept_min"]
                  and r.off_trigger_after <= t["purified_off_trigger_max"])
        else:  # a real model's: ASR and perplexity within a ratio of the suspicious model's
            ok = r.asr_after <= t["purified_real_asr_max"] and r.perplexity_ratio <= t["purified_real_perplexity_ratio_max"]
        out.append(Finding(f"{r.model}: ASR {r.asr_before:.1%} → {r.asr_after:.1%}, accuracy {r.clean_accuracy_before:.1%}"
                           f" → {r.clean_accuracy_after:.1%} ({r.accuracy_kept:.1%} kept), perplexity "
                           f"{r.perplexity_before:.2f} → {r.perplexity_after:.2f} (×{r.perplexity_ratio:.3f}), off-trigger "
                           f"{r.off_trigger_after:.1%}, tau {r.tau:g}: the per-model targets.", bool(ok)))
    table = study.settings.set_index("setting")
    if study.ablations:
        p_asr = table.loc["paper: tau 3%, paper repair", "asr"]
        out.append(Finding(f"The paper's τ of 3% with its repair leaves ASR at {p_asr:.1%} on {study.focus.name}"
                           + (": the paper's setting does not transfer here." if p_asr > t["purified_asr_max"] else "."),
                           bool(p_asr <= t["purified_asr_max"])))
    else:
        out.append(Finding("The settings table and the effect of N were not run (`ablations = False` in this preset)."))
    by = study.overlap_by_source()
    sig_p, rand_p = by.loc["signature", "precision"], by.loc["random", "precision"]
    better = sig_p >= t["precision_over_random"] * rand_p and sig_p - rand_p >= t["precision_margin"]
    out.append(Finding(f"Precision of the signature's top {study.overlap_tau:.0%} against the real update's top channels: "
                       f"{sig_p:.2f} (random channels: {rand_p:.2f})" + (
                           ": better than chance." if better else ": only slightly above chance." if sig_p > rand_p
                           else ": no better than chance here."), bool(better)))
    if study.ablations:
        tau = study.run.tau
        r_row = table.loc[f"random channels, tau {tau:g}, this repair"]
        s_row = table.loc[f"signature, tau {tau:g} (auto), this repair"]
        out.append(Finding(f"At the same τ and repair, random channels give ASR {r_row.asr:.1%} / accuracy "
                           f"{r_row.clean_accuracy:.1%}, the signature ASR {s_row.asr:.1%} / accuracy "
                           f"{s_row.clean_accuracy:.1%}.", bool(s_row.asr < r_row.asr)))
    if len(study.n_curve) > 1:
        out.append(n_effect_finding(study.n_curve))
    return out


def n_effect_finding(curve) -> Finding:
    """The paper's effect of N (ASR falls as variants are added, flat from N = 6) judged on ``curve``
    (columns ``n_variants``, ``asr``, ``tau``; at one τ): it holds when ASR at the smallest N exceeds ASR
    at the largest by ``n_effect_drop_min`` and the N from ``n_flat_from`` on stay within that of each other."""
    t = THRESHOLDS
    curve = curve.sort_values("n_variants")
    asr, ns = list(curve["asr"]), list(curve["n_variants"])
    listed = (f"Effect of N at τ {curve['tau'].iloc[0]:g}: ASR {', '.join(f'{a:.0%}' for a in asr)} "
              f"for N = {', '.join(map(str, ns))}")
    drop = asr[0] - asr[-1]
    late = [a for n, a in zip(ns, asr) if n >= t["n_flat_from"]]
    flat = len(late) < 2 or max(late) - min(late) <= t["n_effect_drop_min"]
    if drop >= t["n_effect_drop_min"]:
        return Finding(f"{listed}: more variants remove more, as in the paper" + (
            f", flat from N = {t['n_flat_from']}." if flat else f", but not flat from N = {t['n_flat_from']}."), flat)
    if asr[0] <= t["removed_asr_max"]:
        return Finding(f"{listed}: one variant already removes the backdoor at this τ, so the paper's gain from "
                       "more variants does not show here (τ and the repair do the work).", False)
    return Finding(f"{listed}: ASR does not fall by {t['n_effect_drop_min']:.0%} from N = {ns[0]} to N = {ns[-1]}; "
                   "the paper's gain from more variants does not show here.", False)


#: the dev presets of data/grid.yaml whose committed grids notebook 02 compares (each one change to the method)
DEV_PRESETS = ("dev1-paper", "dev1-removal", "dev1", "dev3a", "dev2", "dev3b", "dev3c", "dev4", "dev5", "dev5-all", "dev6a-all", "dev6c-all", "dev6d-all", "dev6f-all", "dev6e-all", "dev5-all-s1", "dev6f-all-s1")


@dataclass
class DevDirections:
    """Changes to the method measured on the dev cells (``reports/grid-<preset>/``, committed)."""

    cells: object  # DataFrame: one row per (preset, cell)
    summary: object  # DataFrame: one row per preset


#: the caption of notebook 02's dev table
DEV_CAPTION = ("Changes to the method on the dev cells (one seed each: seed 0, or seed 1 where the preset's name ends "
               "in -s1): purify run's ASR and the share of clean accuracy kept, per preset of data/grid.yaml")


def dev_directions(presets=None, reports_root=None) -> DevDirections:
    """The committed dev runs of ``presets`` (default :data:`DEV_PRESETS`) compared: one row per preset."""
    from purifylib.reports import REPO_ROOT
    from purifylib.studies.grid_tables import dev_comparison, dev_summary

    cells = dev_comparison(list(DEV_PRESETS if presets is None else presets), reports_root or REPO_ROOT / "reports")
    return DevDirections(cells=cells, summary=dev_summary(cells) if len(cells) else cells)


#: where ``benchmarks/screen_neutral_real.py`` writes its screen of a pretrained model's dev cells
PRETRAINED_SCREEN = "dev-neutral-screen"


@dataclass
class PretrainedScreen:
    """Neutralizations of SmolLM2 screened on its dev cells, and where each plant's update lies
    (``reports/dev-neutral-screen/``, committed; empty frames when it has not run)."""

    rows: object  # DataFrame: one row per (cell, candidate)
    geometry: object  # DataFrame: one row per cell (energy-weighted over the MLP modules)

    def findings(self) -> list[str]:
        """What the geometry says, per cell, generated from the numbers."""
        return [f"{g['cell']}: {geometry_finding(g)}" for g in self.geometry.to_dict(orient="records")]


def geometry_finding(g: dict) -> str:
    """One cell's ``geometry_summary`` (the screen's JSON) in words."""
    shares = {float(k.split("@")[1]): v for k, v in g.items() if k.startswith("share@")}
    ratio = max(v / t for t, v in shares.items())
    verdict = ("no better than random channels" if ratio < 1.2 else f"up to {ratio:.1f}x random channels'")
    return ("the signature's flagged channels hold "
            + ", ".join(f"{v:.1%} of the plant's update at tau {t:g}" for t, v in sorted(shares.items()))
            + f" ({verdict}); the span of the variants' differences holds {g['in_span']:.1%} of it, "
            f"and its cosine with their mean difference is {g['cos_mean_delta']:+.3f}.")


def pretrained_screen(reports_root=None) -> PretrainedScreen:
    import json

    import pandas as pd

    from purifylib.reports import REPO_ROOT

    root = (reports_root or REPO_ROOT / "reports") / PRETRAINED_SCREEN
    rows, geometry = [], []
    for path in sorted(root.glob("*.json")):
        d = json.loads(path.read_text())
        cell = " x ".join(d["cell"]["pair"])
        rows += [{"cell": cell, "candidate": name, **r} for name, r in d["rows"].items()]
        if "geometry_summary" in d:
            geometry.append({"cell": cell, **d["geometry_summary"]})
    return PretrainedScreen(rows=pd.DataFrame(rows), geometry=pd.DataFrame(geometry))


def save(study: SignatureStudy, *, preset: str, figures: dict, dev: DevDirections | None = None) -> None:
    """Notebook 02's tables, figures (``{"fig02_...": fig or None}``) and metrics."""
    from purifylib import reports

    if dev is not None and len(dev.cells):
        reports.save_table(dev.summary.round(4), "table02_dev_directions",
                           caption=DEV_CAPTION)
        reports.save_table(dev.cells.round(4), "table02_dev_cells", caption="The same, per dev cell")

    reports.save_table(study.to_frame().round(4), "table02_purification",
                       caption="ASR, false/off-trigger rate and clean accuracy before and after purification")
    reports.save_table(study.overlap.groupby(["source", "module"], as_index=False)[["precision", "spearman"]].mean()
                       .round(4), "table02_ground_truth",
                       caption="Signature vs the real update's channels (precision at tau, rank correlation)")
    if study.ablations:
        reports.save_table(study.settings.round(4), "table02_settings",
                           caption=f"Each change to the paper's recipe, {study.focus.name}")
        reports.save_table(study.n_curve.round(4), "table02_effect_of_n",
                           caption="ASR after purification against the number of variants")
    captions = {"fig02_before_after": "Before and after purification, every attack",
                "fig02_signature_heatmaps": "Channel scores across layers (gate, up, down)",
                "fig02_flagged_share": "Score mass in the flagged channels per layer",
                "fig02_variant_consistency": "Variant consistency per layer",
                "fig02_ground_truth": "Signature precision against the real update, per layer",
                "fig02_effect_of_n": "Effect of the number of variants"}
    for fig_id, fig in figures.items():
        if fig is not None:
            reports.save_figure(fig, fig_id, caption=captions.get(fig_id, ""))
    run_ = study.run
    reports.record_metrics("02_signature", {
        "preset": preset, "zoo": study.config.to_dict(), "purify": study.purify_config.to_dict(),
        "models": study.purified.rows, "average_asr_after": float(study.to_frame()["asr_after"].mean()),
        "loo_folds": run_.folds, "tau_trials": run_.tau_trials, "settings": study.settings.to_dict(orient="records"),
        "overlap": study.overlap_by_source().reset_index().to_dict(orient="records"),
        "effect_of_n": study.n_curve.to_dict(orient="records"), "findings": [f.text for f in findings(study)]})
