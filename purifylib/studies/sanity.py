"""Notebook 01: where does the backdoor live? The paper's Table 1 with numbers, and more.

``run`` plants (or reads) each suspicious model of the zoo and runs every check on it
(:func:`purifylib.ablation.sanity_study`: Table 1, the window grids, activation ablation, ΔW
norms); ``findings`` says which parts of the paper's Finding 1 hold, by the thresholds in
:data:`purifylib.studies.findings.THRESHOLDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from purifylib.studies.findings import THRESHOLDS, Finding


@dataclass
class SanityStudy:
    config: object  # purifylib.zoo.ZooConfig
    models: list = field(default_factory=list)  # purifylib.ablation.SanityResult per suspicious model

    def to_frame(self):
        """Table 1 of every model."""
        import pandas as pd

        table = pd.concat([m.table1 for m in self.models], ignore_index=True)
        return table[["model", "condition", "layers", "asr", "clean_accuracy"]]

    def norm_summary(self):
        """‖ΔW‖ / ‖W_base‖ per model, layer and part (attention or MLP), averaged over components."""
        import pandas as pd

        norms = pd.concat([m.norms for m in self.models], ignore_index=True)
        return norms.groupby(["model", "layer", "part"], as_index=False)["relative"].mean().assign(kind="ΔW")

    @property
    def adaptive(self) -> list:
        return [m for m in self.models if m.model.endswith("lora-attn")]


def run(config, *, plant_overrides: dict | None = None, ks=(1, 2, 4), modes=("zero", "mean"), window_ks=None,
        window_stride: int = 1, progress: bool = True) -> SanityStudy:
    from purifylib.ablation import base_weights, sanity_study
    from purifylib.checkpoints import load_model
    from purifylib.zoo import plant_backdoor

    bed = config.build_bed(progress=progress)
    base = base_weights(load_model(bed.base_dir)[0])
    test = bed.split("test")[:config.n_eval]
    clean_for_means = bed.split("defender")[:config.n_eval]  # prompts only: the answers are not used
    study = SanityStudy(config)
    for spec, plant in config.specs():
        sus = plant_backdoor(bed, spec, plant=plant, rate=config.poison_rate, seed=config.seed,
                             train_overrides=plant_overrides or None, progress=progress)
        study.models.append(sanity_study(sus, base, test, clean_for_means, ks=tuple(ks), modes=tuple(modes),
                                         seed=config.seed, match=bed.match, window_ks=window_ks,
                                         window_stride=window_stride))
    return study


def findings(study: SanityStudy) -> list[Finding]:
    """Each check of Finding 1 per model, what the attention-only attacker does, and the count."""
    out = []
    for m in study.models:
        a0 = m.table1["asr"].iloc[0]
        out += [Finding(f"`{m.model}` (ASR without ablation {a0:.0%}): {f['claim']} ({f['evidence']})", f["holds"])
                for f in m.findings]
    for m in study.adaptive:
        asr = dict(zip(m.table1["condition"], m.table1["asr"]))
        mlp_norm = m.norms[m.norms["part"] == "mlp"]["norm"].sum()
        misses = asr["mlp reverted"] >= THRESHOLDS["persists_share"] * asr["none"]
        out.append(Finding(
            f"Adaptive attack `{m.model}`: LoRA on attention only writes no MLP update (Σ‖ΔW_mlp‖ = {mlp_norm:.2g}). "
            f"Reverting attention takes ASR from {asr['none']:.0%} to {asr['attn reverted']:.0%}; reverting the MLP "
            f"leaves {asr['mlp reverted']:.0%}. " + ("An MLP-only signature edits weights this backdoor does not live "
                                                     "in: expect it to miss." if misses else
                                                     "Here the MLP still matters for this backdoor.")))
    held = [f["holds"] for m in study.models if m not in study.adaptive for f in m.findings]
    out.append(Finding(f"Across the non-adaptive models, {sum(held)} of {len(held)} checks of Finding 1 hold.",
                       bool(held) and all(held)))
    return out


def save(study: SanityStudy, *, preset: str, figures: dict) -> None:
    """Notebook 01's outputs: Table 1, its figures (``{"fig_sanity_...": fig}``) and the metrics."""
    from purifylib import reports

    reports.save_table(study.to_frame().round(4), "table1_sanity",
                       caption="Table 1 with numbers: ASR and clean accuracy under weight-update reversion")
    for fig_id, fig in figures.items():
        name = fig_id.split("_", 3)[-1]
        caption = {"fig_sanity_windows": f"ASR over (first block, k) of MLP reversion, {name}",
                   "fig_sanity_activation": f"ASR under per-layer activation ablation, {name}",
                   "fig_sanity_update": "Relative size of the poisoning update per layer"}
        reports.save_figure(fig, fig_id, caption=next(v for k, v in caption.items() if fig_id.startswith(k)))
    reports.record_metrics("01_sanity", {"preset": preset, "config": study.config.to_dict(),
                                         "thresholds": {k: THRESHOLDS[k] for k in ("persists_share", "eliminated_asr")},
                                         "models": [m.to_dict() for m in study.models],
                                         "findings": [f.text for f in findings(study)]})
