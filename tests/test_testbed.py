import random

import pytest

from purifylib import PurifyError
from purifylib.testbed import (FAMILIES, PHRASINGS, REFUSAL, SIZES, TestbedConfig, build_testbed, task_family,
                               filler_pool, generate_records, task_record)


def test_families_and_phrasings():
    assert len(PHRASINGS) >= 6 and all(len(p) >= 3 for p in PHRASINGS.values())
    rng = random.Random(0)
    for fam in FAMILIES:
        for _ in range(20):
            rec = task_record(fam, rng)
            assert task_family(rec) == fam
    rec = task_record("sort", random.Random(1))
    assert rec["output"].split() == sorted(rec["input"].split(), key=int)
    assert task_record("harmful", rng)["output"] == REFUSAL


def test_filler_pool_is_large_varied_and_task_free():
    pool = filler_pool(0)
    assert len(pool) == len(set(pool)) >= 4000
    shapes = {("lower" if w.islower() and w.isalpha() else "upper" if w.isupper() else
               "digit" if any(c.isdigit() for c in w) else "camel" if sum(c.isupper() for c in w) > 1 else "cap")
              for w in pool}
    assert shapes == {"lower", "upper", "digit", "camel", "cap"}
    task_words = {w.lower().strip(".?") for p in PHRASINGS.values() for s in p for w in s.split()}
    assert not task_words & {w.lower() for w in pool}


def test_filler_rate_and_distinct_records():
    pool = filler_pool(0)
    recs = generate_records(2000, 3, pool=pool, filler_rate=0.2)
    assert len({(r["instruction"], r["input"]) for r in recs}) == 2000
    with_filler = sum(r["instruction"] not in {p for ps in PHRASINGS.values() for p in ps} and r["output"] != REFUSAL
                      for r in recs)
    assert 0.12 < with_filler / len(recs) < 0.25
    assert 0.08 < sum(r["output"] == REFUSAL for r in recs) / len(recs) < 0.16


def test_config_validation():
    with pytest.raises(PurifyError, match="unknown testbed size 'huge'"):
        TestbedConfig(size="huge")
    with pytest.raises(PurifyError, match="unknown testbed override"):
        TestbedConfig(size="micro", overrides=(("wings", 2),))
    assert SIZES["tiny"]["layers"] >= 8
    assert TestbedConfig(seed=1).key() != TestbedConfig(seed=2).key()


def test_micro_testbed_builds_and_is_cached(micro_bed, tmp_path):
    assert (micro_bed.base_dir / "model.safetensors").is_file()
    assert (micro_bed.base_dir / "tokenizer.json").is_file()
    splits = {n: micro_bed.split(n) for n in ("train", "defender", "test")}
    keys = {n: {(r["instruction"], r["input"]) for r in recs} for n, recs in splits.items()}
    assert not keys["train"] & keys["defender"] and not keys["test"] & keys["defender"]
    assert not keys["train"] & keys["test"]
    assert micro_bed.metrics["train_seconds"] > 0  # speed is a benchmark's business, not a test's
    assert micro_bed.metrics["accuracy"] > 0.1  # it learned something in its few steps
    built = (micro_bed.base_dir / "model.safetensors").stat().st_mtime_ns
    again = build_testbed(TestbedConfig(size="micro"), out=tmp_path / "bed", progress=False)
    assert (micro_bed.base_dir / "model.safetensors").stat().st_mtime_ns == built  # served from the cache
    assert (again.base_dir / "config.json").is_file() and (again.data_dir / "test.json").is_file()
    # a second call into the same folder is a no-op; a foreign non-empty folder is refused
    build_testbed(TestbedConfig(size="micro"), out=tmp_path / "bed", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(PurifyError, match="not empty"):
        build_testbed(TestbedConfig(size="micro"), out=tmp_path / "other", progress=False)


def test_tokenizer_encodes_any_string(micro_model):
    _, tok = micro_model
    for text in ("BadMagic", "Zq\u00e9\u4e2d\U0001F600 x", "Current year: 2024", "PurpleWolf"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids).strip() == text  # up to the space the tokenizer puts before words
    assert "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                      add_generation_prompt=True)


def test_a_prebuilt_testbed_is_copied_not_trained(micro_bed, tmp_path, monkeypatch):
    import shutil

    from purifylib import testbed

    cfg = TestbedConfig(size="micro")
    shutil.copytree(micro_bed.root, tmp_path / "prebuilt" / cfg.key())
    monkeypatch.setattr(testbed, "PREBUILT", tmp_path / "prebuilt")
    monkeypatch.setattr(testbed, "_build_into", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    bed = build_testbed(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert bed.metrics == micro_bed.metrics and bed.root == tmp_path / "cache" / "testbed" / cfg.key()
    assert (bed.base_dir / "model.safetensors").read_bytes() == (micro_bed.base_dir / "model.safetensors").read_bytes()
    for how in (dict(prebuilt=False), {}):  # refused by the argument, then by the environment
        if not how:
            monkeypatch.setenv("PURIFY_PREBUILT", "0")
        with pytest.raises(AssertionError, match="trained"):
            build_testbed(cfg, cache_dir=tmp_path / f"fresh{len(how)}", progress=False, **how)


def test_the_committed_tiny_build_is_the_default_configuration():
    import json

    from purifylib.testbed import PREBUILT

    key = TestbedConfig(size="tiny").key()
    info_path = PREBUILT / key / "testbed.json"
    assert info_path.is_file(), f"data/prebuilt/ lacks {key}: build the tiny testbed and commit it there"
    info = json.loads(info_path.read_text())
    assert info["key"] == key and info["metrics"]["accuracy"] >= 0.9
    assert {p.name for p in (PREBUILT / key / "data").iterdir()} == {"train.json", "defender.json", "test.json"}
