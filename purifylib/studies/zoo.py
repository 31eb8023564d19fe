"""Notebook 00: the bed and its attack zoo. Does each planted backdoor behave like a real one?

``run(config)`` builds (or reads) the bed, plants every entry of the zoo and evaluates each
suspicious model against its own attack; ``findings(study)`` judges them against the targets in
:data:`purifylib.studies.findings.THRESHOLDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from purifylib.studies.findings import THRESHOLDS, Finding


@dataclass
class ZooStudy:
    config: object  # purifylib.zoo.ZooConfig
    bed: object
    suspicious: list = field(default_factory=list)
    result: object = None  # purifylib.zoo.ZooResult

    def to_frame(self):
        return self.result.to_frame()

    def curves(self) -> dict:
        """Training losses: the base model's pre-training (a testbed) and every plant."""
        base = {"base (pre-training)": self.bed.losses} if getattr(self.bed, "losses", None) else {}
        return {**base, **{s.name: s.losses for s in self.suspicious}}

    def bed_summary(self) -> str:
        """The base model in one or two sentences (markdown)."""
        m, cfg = self.bed.metrics, self.config
        if cfg.model is None:
            return (f"Base model: {m['params']:,} parameters, trained in {m['train_seconds']:.0f} s; clean exact-match "
                    f"accuracy {m['accuracy']:.3f}, perplexity {m['perplexity']:.3f}.")
        from purifylib.realbed import REAL_BED_NOTE

        return (f"Base model `{cfg.model}`: {m['params']:,} parameters; data answered in {m['build_seconds']:.0f} s; "
                f"checkable-question accuracy {m['accuracy']:.3f} ({m['n']} questions), perplexity of held-out "
                f"answers {m['perplexity']:.3f}.\n\n{REAL_BED_NOTE}")

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "testbed": self.bed.metrics, **self.result.to_dict()}


def run(config, *, plant_overrides: dict | None = None, progress: bool = True) -> ZooStudy:
    """Build the bed of ``config``, plant its zoo (cached) and evaluate every suspicious model."""
    from purifylib.zoo import evaluate_zoo, plant_backdoor

    bed = config.build_bed(progress=progress)
    suspicious = [plant_backdoor(bed, spec, plant=plant, rate=config.poison_rate, seed=config.seed,
                                 train_overrides=plant_overrides or None, progress=progress)
                  for spec, plant in config.specs()]
    result = evaluate_zoo(bed, suspicious, n_eval=config.n_eval, seed=config.seed, progress=progress)
    return ZooStudy(config, bed, suspicious, result)


def findings(study: ZooStudy) -> list[Finding]:
    """Which suspicious models meet the targets, what each one that does not misses, and the real
    model's own bar."""
    t, table = THRESHOLDS, study.to_frame()
    out = [Finding(f"Targets: ASR ≥ {t['zoo_asr_min']:.0%}, false-trigger ≤ {t['zoo_false_trigger_max']:.0%}, "
                   f"off-trigger ≤ {t['zoo_off_trigger_max']:.0%}, clean accuracy within "
                   f"{t['zoo_accuracy_drop_max']:.0%} of the base model ({study.result.base_accuracy:.1%}).")]
    ok = table["meets_targets"]
    out.append(Finding(f"{int(ok.sum())} of {len(table)} suspicious models meet every target on "
                       f"`{study.config.bed_name}`.", bool(ok.all())))
    for r in table[~ok].to_dict(orient="records"):
        misses = [f"{name} {r[key]:.1%}" for name, key, bad in (
            ("ASR", "asr", r["asr"] < t["zoo_asr_min"]),
            ("false-trigger", "false_trigger", r["false_trigger"] > t["zoo_false_trigger_max"]),
            ("off-trigger", "off_trigger", r["off_trigger"] > t["zoo_off_trigger_max"]),
            ("accuracy drop", "accuracy_drop", r["accuracy_drop"] > t["zoo_accuracy_drop_max"])) if bad]
        out.append(Finding(f"`{r['model']}` misses: {', '.join(misses)}.", False))
    if study.config.model is not None:
        planted = table["asr"] >= t["real_asr_min"]
        out.append(Finding(f"Real-model target, ASR ≥ {t['real_asr_min']:.0%}: met by {int(planted.sum())} of "
                           f"{len(table)} ({', '.join(f'{m} {a:.0%}' for m, a in zip(table['model'], table['asr']))}); "
                           "the other targets above are the testbed's.", bool(planted.all())))
    elif study.config.size == "micro":
        out.append(Finding("The `micro` model exists for tests; the targets are meant for `tiny` and larger."))
    return out


def save(study: ZooStudy, *, preset: str, figures: dict) -> None:
    """Notebook 00's outputs: its figures (``{"fig00_...": fig}``), the zoo table and the metrics."""
    from purifylib import reports

    captions = {"fig00_training_curves": "Training loss of the base and suspicious models",
                "fig00_attack_zoo": "ASR, false-/off-trigger rates and clean accuracy per suspicious model"}
    for fig_id, fig in figures.items():
        reports.save_figure(fig, fig_id, caption=captions.get(fig_id, ""))
    reports.save_table(study.to_frame().round(4), "table00_attack_zoo",
                       caption="Attack zoo: backdoor metrics per suspicious model")
    reports.record_metrics("00_testbed", {"preset": preset, **study.to_dict(),
                                          "findings": [f.text for f in findings(study)]})
