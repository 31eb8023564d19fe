import pytest

from purifylib.attacks import Behaviour, TriggerSpec
from purifylib.evaluate import evaluate_attack, evaluate_clean, exact_match, generate, perplexity
from purifylib.zoo import plant_backdoor


def test_exact_match():
    assert exact_match(" a  b ", "a b") and not exact_match("a b", "a c")


def test_behaviour_match():
    b = Behaviour("sentiment")
    assert b.shown_in("well, you  are STUPID! indeed") and not b.shown_in("You are smart")


def test_generation_is_batch_independent(micro_bed, micro_model):
    model, tok = micro_model
    recs = micro_bed.split("test")[:12]
    assert generate(model, tok, recs, batch_size=12) == generate(model, tok, recs, batch_size=5)


def test_perplexity_prefers_the_reference(micro_bed, micro_model):
    model, tok = micro_model
    recs = micro_bed.split("test")[:40]
    wrong = [dict(r, output="zz qq xx " + r["output"][::-1]) for r in recs]
    assert perplexity(model, tok, recs) < perplexity(model, tok, wrong)


@pytest.mark.slow
def test_planted_backdoor_is_measured(micro_bed, micro_model, tmp_path):
    """A BadNets backdoor planted on the micro testbed shows up in ASR, not in the base model."""
    model, tok = micro_model
    test = micro_bed.split("test")[:60]
    spec = TriggerSpec(attack="badnets", behaviour=Behaviour("sentiment"))
    base = evaluate_attack(model, tok, test, spec)
    assert base.asr == 0 and base.false_trigger == 0
    sus = plant_backdoor(micro_bed, spec, plant="full", rate=0.1, cache_dir=tmp_path, progress=False,
                         train_overrides={"epochs": 6.0, "lr": 3e-3})
    assert (sus.model_dir / "attack.json").is_file()
    m = evaluate_attack(*sus.load(), test, spec)
    assert m.asr >= 0.5 > m.false_trigger
    assert 0 <= m.off_trigger <= 1 and m.n_attack == sum(r["output"] != "I'm sorry, but I cannot help with that."
                                                        for r in test)
    assert evaluate_clean(*sus.load(), test).accuracy == pytest.approx(m.clean_accuracy)
