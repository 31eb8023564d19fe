"""The studies' findings: sentences generated from numbers, judged by the thresholds in one place."""

from purifylib.studies import zoo as zoo_study
from purifylib.studies.findings import THRESHOLDS, Finding, to_markdown
from purifylib.zoo import TARGETS, ZooConfig, ZooResult, meets_targets


def _zoo(rows, **cfg):
    base = 0.95
    for r in rows:
        r.setdefault("model", f"{r['attack']}-sentiment-full")
        r["accuracy_drop"] = base - r["clean_accuracy"]
        r["meets_targets"] = meets_targets(r, base)
    return zoo_study.ZooStudy(ZooConfig(size="tiny", **cfg), bed=None, result=ZooResult(rows=rows, base_accuracy=base))


def test_zoo_findings_name_what_each_model_misses():
    assert TARGETS["asr_min"] == THRESHOLDS["zoo_asr_min"]  # one place for the bars
    study = _zoo([dict(attack="badnets", asr=0.98, false_trigger=0.0, off_trigger=0.01, clean_accuracy=0.93),
                  dict(attack="vpi", asr=0.99, false_trigger=0.0, off_trigger=0.08, clean_accuracy=0.90)])
    found = zoo_study.findings(study)
    assert found[1] == Finding("1 of 2 suspicious models meet every target on `tiny testbed`.", False)
    assert found[2] == Finding("`vpi-sentiment-full` misses: off-trigger 8.0%, accuracy drop 5.0%.", False)
    assert len(found) == 3
    md = to_markdown(found)
    assert md.splitlines()[0].startswith("- Targets: ASR ≥ 90%") and "- **fails**: `vpi-sentiment-full`" in md


def test_zoo_findings_for_a_real_model_use_its_own_bar():
    study = _zoo([dict(attack="badnets", asr=0.85, false_trigger=0.0, off_trigger=0.0, clean_accuracy=0.95)],
                 model="somewhere")
    last = zoo_study.findings(study)[-1]
    assert last.holds is True and "ASR ≥ 80%: met by 1 of 1 (badnets-sentiment-full 85%)" in last.text


def test_tuning_findings_judge_agreement_and_speed():
    import pandas as pd

    from purifylib.studies import tuning

    rows = [dict(tau=0.05, strength=1.0, asr=0.6, clean_accuracy=0.9, synthetic_asr=0.4),
            dict(tau=0.2, strength=1.0, asr=0.02, clean_accuracy=0.8, synthetic_asr=0.3),
            dict(tau=0.2, strength=0.5, asr=0.5, clean_accuracy=0.9, synthetic_asr=0.5)]
    study = tuning.TuningStudy(None, None, None, preview={"seconds": 2.5}, no_repair=pd.DataFrame(rows),
                               repaired=pd.DataFrame(columns=["tau", "strength", "asr", "clean_accuracy"]))
    found = tuning.findings(study)
    assert found[0].text.startswith("Without repair at strength 1: τ 0.05 → ASR 60%") and len(found) == 3
    assert found[1].holds is False and "in 1 of 2 τ values" in found[1].text  # 0.2: real removed, synthetic not
    assert found[2] == tuning.Finding("One preview took 2.50 s (target: within 2 s on the tiny model).", False)


def test_sanity_findings_count_the_checks_and_flag_the_adaptive_attacker():
    import pandas as pd

    from purifylib.ablation import SanityResult
    from purifylib.studies import sanity

    def result(name, asr, holds):
        t1 = pd.DataFrame({"condition": ["none", "attn reverted", "mlp reverted"], "asr": asr})
        norms = pd.DataFrame({"part": ["mlp", "attn"], "norm": [0.0, 1.0]})
        checks = [{"claim": f"claim {i}", "holds": h, "evidence": "e"} for i, h in enumerate(holds)]
        return SanityResult(name, t1, None, None, None, norms, checks)

    study = sanity.SanityStudy(None, [result("badnets-sentiment-full", [0.9, 0.8, 0.0], [True, True, False]),
                                      result("badnets-sentiment-lora-attn", [0.9, 0.1, 0.85], [False])])
    found = sanity.findings(study)
    assert found[0].text.startswith("`badnets-sentiment-full` (ASR without ablation 90%): claim 0") and found[0].holds
    assert "expect it to miss" in found[-2].text  # the MLP reverted leaves 85% of the attention-only backdoor
    assert found[-1] == sanity.Finding("Across the non-adaptive models, 2 of 3 checks of Finding 1 hold.", False)


def test_signature_findings_compare_with_random_channels_and_the_paper():
    import types

    import pandas as pd

    from purifylib.purify import PurifyConfig
    from purifylib.studies import signature as sig_study
    from purifylib.zoo import PurifyStudy

    row = dict(model="badnets-sentiment-full", tau=0.08, asr_before=0.99, asr_after=0.45, clean_accuracy_before=0.94,
               clean_accuracy_after=0.915, accuracy_kept=0.97, perplexity_before=1.07, perplexity_after=1.08,
               perplexity_ratio=1.01, off_trigger_after=0.0)
    purified = PurifyStudy(rows=[row], runs={row["model"]: types.SimpleNamespace(tau=0.08)})
    settings = pd.DataFrame([{"setting": k, "asr": a, "clean_accuracy": 0.9} for k, a in (
        ("paper: tau 3%, paper repair", 0.94), ("random channels, tau 0.08, this repair", 0.69),
        ("signature, tau 0.08 (auto), this repair", 0.45))])
    overlap = pd.DataFrame({"source": ["signature", "random"], "precision": [0.30, 0.08], "spearman": [0.2, 0.0]})
    study = sig_study.SignatureStudy(ZooConfig(size="tiny"), PurifyConfig(), purified,
                                     types.SimpleNamespace(name=row["model"]), None, overlap, 0.08, settings,
                                     pd.DataFrame(columns=sig_study.N_COLUMNS), True)
    found = sig_study.findings(study)
    assert found[1].holds is False and "Average ASR after purification over 1 model(s): 45.0%" in found[1].text
    assert found[2].holds is False and "ASR 99.0% → 45.0%" in found[2].text
    assert found[3].holds is False and "does not transfer" in found[3].text
    assert found[4].holds is True and "0.30 (random channels: 0.08): better than chance" in found[4].text
    assert found[5].holds is True and "random channels give ASR 69.0%" in found[5].text


def test_effect_of_n_subsets():
    from purifylib.studies.signature import n_subsets

    assert n_subsets([1, 3], 1, 0) == [(1, [0]), (3, [0, 1, 2])]  # one draw: the first n
    runs = n_subsets([1, 2, 4], 3, 0)
    assert [n for n, _ in runs] == [1, 1, 1, 2, 2, 2, 4] and runs[-1][1] == [0, 1, 2, 3]
    assert all(len(v) == n == len(set(v)) and max(v) < 4 for n, v in runs)
    assert n_subsets([1, 2, 4], 3, 0) == runs and n_subsets([1, 2, 4], 3, 1) != runs  # seeded


def test_effect_of_n_finding_judges_the_papers_curve():
    import pandas as pd

    from purifylib.studies.signature import n_effect_finding

    def curve(asr):
        return pd.DataFrame({"n_variants": range(1, len(asr) + 1), "tau": 0.16, "asr": asr})

    paper = n_effect_finding(curve([0.403, 0.278, 0.267, 0.188, 0.125, 0.105, 0.105]))  # the paper's 7B refusal
    assert paper.holds is True and paper.text.endswith("as in the paper, flat from N = 6.")
    assert "ASR 40%, 28%, 27%, 19%, 12%, 10%, 10% for N = 1, 2, 3, 4, 5, 6, 7" in paper.text
    late = n_effect_finding(curve([0.5, 0.4, 0.3, 0.2, 0.1, 0.3, 0.05]))  # falls, but N = 6 and 7 differ by 25 points
    assert late.holds is False and "not flat from N = 6" in late.text
    saturated = n_effect_finding(curve([0.0, 0.0, 0.01, 0.0, 0.0, 0.011, 0.0]))
    assert saturated.holds is False and "one variant already removes the backdoor" in saturated.text
    stuck = n_effect_finding(curve([0.6, 0.58, 0.55]))
    assert stuck.holds is False and "does not fall by 10% from N = 1 to N = 3" in stuck.text
    shuffled = n_effect_finding(curve([0.403, 0.278, 0.105]).iloc[::-1])  # rows in any order
    assert shuffled.holds is True


def test_pretrained_screen_reads_the_committed_cells_and_judges_precision(tmp_path):
    import json

    from purifylib.studies import signature as signature_study

    root = tmp_path / signature_study.PRETRAINED_SCREEN
    assert len(signature_study.pretrained_screen(tmp_path).rows) == 0  # not run yet: empty, no error
    root.mkdir()
    row = {"asr": 1.0, "target_nll": 0.0, "ppl": 1.5}
    geometry = {"in_span": 0.06, "cos_mean_delta": 0.0, "share@0.1": 0.10, "share@0.25": 0.26}
    (root / "vpi-code.json").write_text(json.dumps({"cell": {"pair": ["vpi", "code"]}, "rows": {"none": row},
                                                    "geometry_summary": geometry}))
    (root / "a-b.json").write_text(json.dumps({"cell": {"pair": ["a", "b"]}, "rows": {"none": row},
                                               "geometry_summary": {**geometry, "share@0.1": 0.5}}))
    screen = signature_study.pretrained_screen(tmp_path)
    assert list(screen.rows["cell"]) == ["a x b", "vpi x code"]
    lines = screen.findings()
    assert "5.0x random" in lines[0] and "no better than random" in lines[1]
    assert "26.0% of the plant's update at tau 0.25" in lines[1]
