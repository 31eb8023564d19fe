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


def test_forced_match_reads_greedy_decoding_from_one_forward_pass(micro_bed, micro_model):
    from purifylib.evaluate import forced_match, generate, shared_prefix

    model, tok = micro_model
    records = micro_bed.split("test")[:16]
    said = generate(model, tok, records, max_new_tokens=8)
    # the model's own greedy answers (to the end, empty ones too) are what it would say; another record's is not
    own = forced_match(model, tok, records, said, max_tokens=12, stop=True)
    assert sum(own) >= 15
    assert not any(forced_match(model, tok, records, [""] * 16)) and sum(forced_match(model, tok, records, said)) < 16
    other = forced_match(model, tok, records, said[1:] + said[:1], max_tokens=4)
    assert sum(o for o, a, b in zip(other, said, said[1:] + said[:1]) if a.split()[:2] != b.split()[:2]) == 0
    # the shared chat-template prefix runs once without changing the answer
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2 and shared_prefix([[7], [7]]) == 0
    assert own == forced_match(model, tok, records, said, max_tokens=12, stop=True, share_prefix=False)
    assert forced_match(model, tok, [], []) == []
    with pytest.raises(ValueError, match="2 records but 1 targets"):
        forced_match(model, tok, records[:2], said[:1])
    # probe sets of other lengths and rules answer in one pass as they do apart (a stop flag per record)
    short = [{**r, "instruction": r["instruction"].split(".")[0][:20]} for r in records[:6]]
    said_short = generate(model, tok, short, max_new_tokens=8)
    alone = forced_match(model, tok, short, said_short, max_tokens=4)
    assert sum(alone) >= 5
    both = forced_match(model, tok, records + short, said + said_short, max_tokens=12, stop=[True] * 16 + [False] * 6)
    assert both[:16] == own and both[16:] == forced_match(model, tok, short, said_short, max_tokens=12)
    assert forced_match(model, tok, short + records, said_short + said, max_tokens=4,
                        stop=[False] * 6 + [True] * 16)[:6] == alone
    with pytest.raises(ValueError, match="stop flags"):
        forced_match(model, tok, records[:2], said[:2], stop=[True])
