"""Notebook 03: tuning the neutralization. How much to cut, and where?

``prepare`` purifies the suspicious model as ``purify run`` would (cached variants) and readies the
live tuner on the run's own hold-out split; ``sweep`` measures one preview and the τ × strength
grid with and without repair; ``findings`` says what the sweep shows, judged by
:data:`purifylib.studies.findings.THRESHOLDS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from purifylib.studies.findings import THRESHOLDS, Finding


@dataclass
class TuningStudy:
    suspicious: object  # purifylib.zoo.Suspicious
    run: object  # purifylib.purify.PurifyResult (its split is the one the tuner and the repair use)
    state: object  # purifylib.tuner.Tuner
    preview: dict | None = None
    no_repair: object = None  # DataFrame
    repaired: object = None  # DataFrame

    def to_frame(self):
        import pandas as pd

        return pd.concat([self.no_repair, self.repaired], ignore_index=True)

    def panels(self) -> dict:
        """ASR and clean accuracy over τ × strength, without and with repair (heatmap panels)."""
        return {f"{metric}, {rep}": df.pivot_table(index="tau", columns="strength", values=metric)
                for metric in ("asr", "clean_accuracy")
                for rep, df in (("no repair", self.no_repair), ("repaired", self.repaired))}

    def preview_frame(self):
        import pandas as pd

        keys = ("tau", "strength", "synthetic_asr", "asr", "false_trigger", "off_trigger", "clean_accuracy", "seconds")
        return pd.DataFrame([{k: self.preview[k] for k in keys}])


def prepare(zoo_config, purify_config, *, plant_overrides: dict | None = None, n_probe: int = 48,
            progress: bool = True) -> TuningStudy:
    """Plant the zoo's first entry (cached), purify it with ``purify_config`` and ready the tuner."""
    from purifylib import tuner
    from purifylib.purify import purify
    from purifylib.zoo import plant_backdoor

    bed = zoo_config.build_bed(progress=progress)
    spec, plant = zoo_config.specs()[0]
    sus = plant_backdoor(bed, spec, plant=plant, rate=zoo_config.poison_rate, seed=zoo_config.seed,
                         train_overrides=plant_overrides or None, progress=progress)
    run = purify(sus.model_dir, bed.split("defender"), purify_config, adapter_dir=sus.adapter_dir, progress=progress)
    model, tok = sus.load()
    # the testbed's held-out defender records have exact answers; a real model's are its own, so its
    # checkable questions measure accuracy in the tuner instead
    records = run.split.holdout if bed.match == "exact" else bed.split("test")
    state = tuner.prepare(model, tok, run.signature, run.variants, records, how=run.neutralization, spec=spec,
                          n_probe=n_probe, seed=purify_config.seed, match=bed.match)
    return TuningStudy(sus, run, state)


def sweep(study: TuningStudy, taus, strengths, repair_taus, repair_strengths, *, progress: bool = True) -> TuningStudy:
    """One preview at the auto τ, then τ × strength without repair (``taus`` and the auto τ, so its point
    is on the grid whichever τ the rule chose on this machine), and the repaired part of the grid."""
    from purifylib import tuner

    study.preview = tuner.preview(study.state, tau=study.run.tau, strength=1.0)
    taus = sorted({float(t) for t in taus} | {float(study.run.tau)})
    study.no_repair = tuner.grid(study.state, taus, strengths, progress=progress)
    repaired = tuner.grid(study.state, repair_taus, repair_strengths, repair_records=study.run.split.repair,
                          repair_cfg=study.run.config.repair_config(), reload=study.suspicious.load, progress=progress)
    study.repaired = repaired[repaired["repaired"]]
    return study


def findings(study: TuningStudy) -> list[Finding]:
    removed, slow = THRESHOLDS["removed_asr_max"], THRESHOLDS["preview_seconds_max"]
    full = study.no_repair[study.no_repair["strength"] == 1.0]
    out = [Finding("Without repair at strength 1: " + ", ".join(
        f"τ {r.tau:g} → ASR {r.asr:.0%}, accuracy {r.clean_accuracy:.0%}, synthetic ASR {r.synthetic_asr:.0%}"
        for r in full.itertuples()) + ".")]
    if len(study.repaired):
        out.append(Finding("Repaired: " + ", ".join(f"τ {r.tau:g} s {r.strength:g} → ASR {r.asr:.0%}, accuracy "
                                                    f"{r.clean_accuracy:.0%}" for r in study.repaired.itertuples()) + "."))
    agree = (full["synthetic_asr"] <= removed) == (full["asr"] <= removed)
    out.append(Finding(f"The held-out synthetic ASR and the real ASR agree on 'removed' (≤ {removed:.0%}) in "
                       f"{int(agree.sum())} of {len(full)} τ values at strength 1"
                       + (": the trigger-free signal tracks the real one here." if agree.all()
                          else ": they disagree somewhere."), bool(agree.all())))
    secs = study.preview["seconds"]
    out.append(Finding(f"One preview took {secs:.2f} s (target: within {slow:g} s on the tiny model).", secs <= slow))
    return out


def save(study: TuningStudy, *, preset: str, figure) -> None:
    from purifylib import reports

    name = study.suspicious.name
    reports.save_table(study.to_frame().round(4), "table03_tau_strength",
                       caption=f"ASR and clean accuracy over tau x strength, {name}")
    reports.save_figure(figure, "fig03_tau_strength",
                        caption="ASR and clean accuracy over tau x strength, with and without repair")
    keys = ("synthetic_asr", "asr", "false_trigger", "off_trigger", "clean_accuracy", "seconds")
    reports.record_metrics("03_tuning", {"preset": preset, "model": name, "auto_tau": study.run.tau,
                                         "preview": {k: study.preview[k] for k in keys},
                                         "sweep": study.to_frame().to_dict(orient="records"),
                                         "findings": [f.text for f in findings(study)]})
