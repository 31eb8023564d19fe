"""Benchmark: how each way of neutralizing treats a real pretrained model (SmolLM2 by default).

    python benchmarks/bench_neutralization_real.py [--n-test 30]

Uses what ``purify reproduce --preset real`` caches (``make real`` first, or it builds them: the
real testbed, the BadNets plant and the two LoRA variants of that preset), then, with no repair,
neutralizes the suspicious model in several ways and prints, for each, the real backdoor's ASR
and clean accuracy on the first ``--n-test`` test questions, the test-answer perplexity, and the
held-out perplexity on the defender's own (self-answered) records, each over the suspicious
model's. Rows: the paper's re-initialisation of the flagged 5% of channels, the same with zeros,
the same number of *random* channels re-initialised (a control), and negation of the variants'
mean difference at several τ and α, on the MLP alone and with every attention head.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (label, neutral, tau, alpha, heads per layer, random channels, zeros)
ROWS = [
    ("reinit flagged 5% (paper)", "reinit", 0.05, 1.0, 0, False, False),
    ("zero flagged 5%", "reinit", 0.05, 1.0, 0, False, True),
    ("reinit random 5% (control)", "reinit", 0.05, 1.0, 0, True, False),
    ("negate MLP, tau 100%, alpha 1.25", "negate", 1.0, 1.25, 0, False, False),
    ("negate MLP, tau 100%, alpha 2", "negate", 1.0, 2.0, 0, False, False),
    ("negate MLP + heads, tau 50%, alpha 1.25", "negate", 0.5, 1.25, "all", False, False),
    ("negate MLP + heads, tau 100%, alpha 1.25 (preset)", "negate", 1.0, 1.25, "all", False, False),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-test", type=int, default=30)
    args = ap.parse_args()

    import pandas as pd
    import torch
    import yaml

    import purifylib.neutralize as neutralize
    from purifylib.baselines import random_signature
    from purifylib.evaluate import evaluate_attack, evaluate_clean
    from purifylib.defender import split_clean
    from purifylib.purify import PurifyConfig
    from purifylib.signature import score
    from purifylib.variants import VariantConfig, build_variants
    from purifylib.zoo import ZooConfig, defender_records, eval_kwargs, plant_backdoor

    p = yaml.safe_load((ROOT / "notebooks/params/real.yaml").read_text())["02_backdoor_signature"]
    zcfg = ZooConfig(entries=tuple(map(tuple, p["zoo"])), poison_rate=p["poison_rate"], model=p["model"])
    bed = zcfg.build_bed()
    spec, plant = zcfg.specs()[0]
    sus = plant_backdoor(bed, spec, plant=plant, rate=zcfg.poison_rate, seed=zcfg.seed,
                         train_overrides=p["plant_overrides"])
    cfg = PurifyConfig(variants=VariantConfig(n_variants=p["n_variants"], **p["variant_overrides"]),
                       **p["purify_overrides"])
    split, cfg = split_clean(defender_records(bed, sus), cfg)  # answered by the suspicious model (cached)
    variants = build_variants(sus.model_dir, split.variants, cfg.variants)
    test, kw = bed.split("test")[:args.n_test], eval_kwargs(bed)
    model, tok = sus.load()
    base = evaluate_attack(model, tok, test, spec, **kw)
    base_holdout = evaluate_clean(model, tok, split.holdout).perplexity
    sig = score(model, variants, heads=True, progress=False)
    n_heads = sig.meta["n_heads"]
    rows = [{"neutralization": "none (suspicious)", "asr": base.asr, "clean_accuracy": base.clean_accuracy,
             "test_ppl_ratio": 1.0, "holdout_ppl_ratio": 1.0, "seconds": 0.0}]
    xavier = neutralize._xavier
    for label, neutral, tau, alpha, heads, random_channels, zeros in ROWS:
        t = time.time()
        model, tok = sus.load()
        how = neutralize.Neutralization(tau=tau, heads=n_heads if heads == "all" else heads, way=neutral, alpha=alpha)
        s = random_signature(sig, seed=0) if random_channels else sig
        neutralize._xavier = (lambda w, seed: torch.zeros_like(w)) if zeros else xavier
        try:
            neutralize.apply(model, s, how, variants=variants)
        finally:
            neutralize._xavier = xavier
        m = evaluate_attack(model, tok, test, spec, **kw)
        h = evaluate_clean(model, tok, split.holdout).perplexity
        rows.append({"neutralization": label, "asr": m.asr, "clean_accuracy": m.clean_accuracy,
                     "test_ppl_ratio": m.perplexity / base.perplexity, "holdout_ppl_ratio": h / base_holdout,
                     "seconds": time.time() - t})
        print(rows[-1], flush=True)
    print(f"\nSmolLM2 BadNets plant ({sus.name}), no repair, {len(test)} test questions; "
          f"suspicious: ASR {base.asr:.0%}, accuracy {base.clean_accuracy:.0%}, test perplexity "
          f"{base.perplexity:.2f}, held-out perplexity {base_holdout:.2f}")
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
