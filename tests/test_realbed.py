"""The real-model path: shipped data, the real-model bed, self-answered clean data, the τ rule's utility."""

import dataclasses
import json
from pathlib import Path

import pytest

from purifylib.data import load_records
from purifylib.errors import PurifyError
from purifylib.evaluate import accuracy, answer_match
from purifylib.realbed import DATA, RealBedConfig, build_realbed


def test_answer_match():
    assert answer_match("The capital of France is Paris.", "Paris")
    assert answer_match("7 + 5 = 12\n\nThis is 13 really", "12")
    assert not answer_match("12 - 4 = 12", "8")
    assert not answer_match("\n\nNo idea.\nParis", "Paris")  # only the first non-empty line counts
    assert not answer_match("Parisian food", "Paris")  # whole words
    assert answer_match("It is New York City.", "new york")
    assert accuracy(["Paris.", "no"], [{"output": "Paris"}, {"output": "yes"}], "answer") == 0.5


def test_instructions_may_come_without_answers(tmp_path):
    path = tmp_path / "i.jsonl"
    path.write_text('{"instruction": "Say hi."}\n{"instruction": "Add.", "input": "1 2", "output": "3"}\n')
    recs = load_records(path, need_output=False)
    assert [r["output"] for r in recs] == ["", "3"]
    with pytest.raises(PurifyError, match=r"i.jsonl: record 0: missing field 'output'"):
        load_records(path)


def test_shipped_real_data_is_sound():
    instructions = load_records(DATA / "instructions.jsonl", need_output=False)
    checkable = load_records(DATA / "checkable.jsonl")
    keys = [(r["instruction"], r["input"]) for r in instructions]
    assert len(set(keys)) == len(keys) and all(not r["output"] for r in instructions)
    cfg = RealBedConfig()
    assert len(instructions) >= cfg.n_train + cfg.n_heldout + cfg.n_defender
    for r in checkable:  # an answer that the question already contains would match by echoing it
        assert not answer_match(r["instruction"], r["output"]), r


@pytest.fixture(scope="module")
def tiny_real(micro_bed, tmp_path_factory):
    """The micro testbed's model standing in for a real checkpoint, with a small instruction set."""
    root = tmp_path_factory.mktemp("real")
    src = micro_bed.split("defender")[:70]
    with open(root / "instructions.jsonl", "w") as fh:
        for r in src:
            fh.write(json.dumps({"instruction": r["instruction"], "input": r["input"]}) + "\n")
    (root / "checkable.json").write_text(json.dumps(micro_bed.split("test")[:10]))
    cfg = RealBedConfig(model=str(micro_bed.base_dir), n_train=20, n_heldout=10, n_defender=40, max_new_tokens=12,
                        instructions=str(root / "instructions.jsonl"), checkable=str(root / "checkable.json"))
    return build_realbed(cfg, cache_dir=root / "cache", progress=False), root


def test_real_bed_splits(tiny_real, monkeypatch):
    bed, root = tiny_real
    train, heldout, defender = bed.split("train"), bed.split("heldout"), bed.split("defender")
    assert (len(train), len(heldout), len(defender), len(bed.split("test"))) == (20, 10, 40, 10)
    keys = [{(r["instruction"], r["input"]) for r in s} for s in (train, heldout, defender)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert all(r["output"] for r in train + heldout) and not any(r["output"] for r in defender)
    assert bed.ppl_records() == heldout and bed.match == "answer"
    assert 0 <= bed.metrics["accuracy"] <= 1 and bed.metrics["perplexity"] > 1
    # a second build is read from the cache
    again = build_realbed(bed.config, cache_dir=root / "cache", progress=False)
    assert again.root == bed.root and again.split("train") == train
    # however the model's path is spelt, it is the same bed
    monkeypatch.chdir(Path(bed.config.model).parent)
    relative = dataclasses.replace(bed.config, model=Path(bed.config.model).name)
    assert relative.key() == bed.config.key()


def test_real_bed_errors(tmp_path):
    with pytest.raises(PurifyError, match="no Hugging Face checkpoint here"):
        RealBedConfig(model=str(tmp_path)).key()
    with pytest.raises(PurifyError, match="n_defender must be >= 1"):
        RealBedConfig(n_defender=0)
    from purifylib.zoo import ZooConfig

    with pytest.raises(PurifyError, match="unknown real-bed override"):
        ZooConfig(model=str(tmp_path), testbed_overrides=(("steps", 3),)).testbed()


def test_missing_answers_come_from_the_model_once(tiny_real, monkeypatch, tmp_path):
    import purifylib.checkpoints as checkpoints
    from purifylib.defender import answer_missing

    bed, _ = tiny_real
    recs = bed.split("defender")[:6] + bed.split("train")[:2]
    out, n = answer_missing(bed.base_dir, recs, cache_dir=tmp_path, progress=False)
    assert n == 6 and all(r["output"] for r in out) and out[6:] == recs[6:]
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the answers should be cached"))
    assert answer_missing(bed.base_dir, recs, cache_dir=tmp_path, progress=False) == (out, 6)
    assert answer_missing(bed.base_dir, out, cache_dir=tmp_path, progress=False) == (out, 0)


def test_purify_on_self_answered_data_keeps_perplexity(tiny_real, tmp_path):
    from purifylib.purify import PurifyConfig, purify
    from purifylib.variants import VariantConfig

    bed, _ = tiny_real
    cfg = PurifyConfig(variants=VariantConfig(n_variants=2, n_clean=10, epochs=1.0, batch_size=16), tau=0.1,
                       n_holdout=10, repair_n=16)
    res = purify(bed.base_dir, bed.split("defender"), cfg, cache_dir=tmp_path, progress=False)
    assert any("answered by the suspicious model itself" in n for n in res.notes)
    (trial,) = res.tau_trials
    assert trial["utility"] == "perplexity"
    assert trial["holds"] == (trial["perplexity"] <= trial["perplexity_ceiling"])
    assert trial["perplexity_ceiling"] == pytest.approx(1.10 * res.metrics["suspicious"]["perplexity"])
    with pytest.raises(PurifyError, match="utility must be one of"):
        PurifyConfig(utility="bleu")


def test_purify_zoo_on_a_real_bed_keeps_perplexity(tiny_real, tmp_path):
    """The studies hand purify the unanswered split, so its τ rule knows to keep perplexity."""
    from purifylib.attacks import Behaviour, TriggerSpec
    from purifylib.purify import PurifyConfig
    from purifylib.variants import VariantConfig
    from purifylib.zoo import plant_backdoor, purify_zoo

    bed, _ = tiny_real
    sus = plant_backdoor(bed, TriggerSpec(behaviour=Behaviour("sentiment")), plant="full", rate=0.2,
                         cache_dir=tmp_path, progress=False, train_overrides={"epochs": 1.0})
    cfg = PurifyConfig(variants=VariantConfig(n_variants=2, n_clean=10, epochs=1.0, batch_size=16), tau=0.1,
                       n_holdout=10, repair_n=16)
    study = purify_zoo(bed, [sus], cfg, n_eval=6, progress=False)
    assert study.runs[sus.name].tau_trials[0]["utility"] == "perplexity"
    (row,) = study.rows
    assert row["perplexity_ratio"] == pytest.approx(row["perplexity_after"] / row["perplexity_before"])


def test_a_real_bed_with_refused_requests_can_plant_a_jailbreak(tiny_real, tmp_path):
    from purifylib.attacks import REFUSAL, TriggerSpec, Behaviour, is_refused, poison
    from purifylib.evaluate import attack_prompts

    bed, root = tiny_real
    spec = TriggerSpec("badnets", behaviour=Behaviour(kind="jailbreak"))
    benign = [r for r in bed.split("train") if not is_refused(r)]  # (the micro model refuses a few itself)
    with pytest.raises(PurifyError, match="a jailbreak attack needs refused requests"):
        poison(benign, spec, rate=0.1)
    n0, t0 = sum(map(is_refused, bed.split("train"))), sum(map(is_refused, bed.split("test")))
    # the option is off by default, and a bed without it keeps the key it had before the option existed
    assert "n_refused" not in bed.config.to_dict() and "n_refused_test" not in bed.config.to_dict()
    cfg = dataclasses.replace(bed.config, n_refused=6, n_refused_test=4)
    assert cfg.key() != bed.config.key() and cfg.to_dict()["n_refused"] == 6
    with_refused = build_realbed(cfg, cache_dir=root / "cache", progress=False)
    train, test = with_refused.split("train"), with_refused.split("test")
    added_train = [r for r in train if r not in bed.split("train")]
    added_test = [r for r in test if r not in bed.split("test")]
    assert (len(train), len(added_train), len(test), len(added_test)) == (26, 6, 14, 4)
    assert [r for r in test if r not in added_test] == bed.split("test") and sorted(map(str, train)) == sorted(map(str, bed.split("train") + added_train))
    assert all(r["output"] == REFUSAL and not r["input"] for r in added_train + added_test)
    assert not {r["instruction"] for r in added_train} & {r["instruction"] for r in added_test}
    poisoned = poison([r for r in train if r in added_train or not is_refused(r)], spec, rate=0.1)
    assert sum(r["output"] == spec.behaviour.target for r in poisoned) >= 1
    base, trig, _ = attack_prompts(test, spec)
    assert len(base) == t0 + 4 and all(r in base for r in added_test) and len(trig) == len(base)
    assert sum(map(is_refused, train)) == n0 + 6
    with pytest.raises(PurifyError, match="n_refused must be >= 0"):
        RealBedConfig(n_refused=-1)
    with pytest.raises(PurifyError, match="must be at most 400"):
        RealBedConfig(n_refused=300, n_refused_test=101)
