"""Is a model trained from scratch or pretrained? The property `purify run` measures to choose its recipe.

    python benchmarks/bench_fragility.py [--cache data/cache] [--smollm2 data/models/smollm2-135m-instruct]
                                         [--seeds 0,1,2] [--out reports/fragility]

For every suspicious model planted in the cache (``CACHE/zoo/*``, full weights) and the testbed's
base model, and for SmolLM2-135M-Instruct when it is installed (``make smollm2``), prints
:func:`purifylib.purify.fragility`: the factor by which re-initialising a seeded random 5% of every
MLP module's channels (no repair) multiplies the perplexity of the defender's held-out records
(geometric mean of three draws), as ``purify run --seed S`` measures it (its default split: the
first ``n_holdout`` records after the seeded shuffle, the draws seeded from S; SmolLM2's records are answered by the model itself first, as ``purify run`` does). Writes
``OUT/tables/fragility.csv`` and ``.md``. ``purify run`` takes the pretrained recipe above
``fragile_ppl`` (2): a threshold that must fall between the two groups on every seed.
"""

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default="data/cache")
    p.add_argument("--smollm2", default="data/models/smollm2-135m-instruct")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="reports/fragility")
    a = p.parse_args()

    import pandas as pd

    from purifylib.beds import open_bed
    from purifylib.checkpoints import load_model
    from purifylib.defender import answer_missing, split_clean
    from purifylib.purify import PurifyConfig, fragility
    from purifylib.reports import save_table

    seeds = [int(s) for s in a.seeds.split(",")]
    bed = open_bed("tiny", None, 0, {}, progress=False, cache_dir=a.cache)
    models = [("tiny testbed base", "from scratch", bed.base_dir, bed.split("defender"))]
    for zoo in sorted(Path(a.cache, "zoo").glob("*-full-*")):
        if (zoo / "model" / "config.json").is_file():
            models.append((zoo.name, "from scratch (planted)", zoo / "model", bed.split("defender")))
    if Path(a.smollm2, "config.json").is_file():
        from purifylib.data import load_records

        records = load_records(Path("data/real/instructions.jsonl"), need_output=False)
        records, _ = answer_missing(a.smollm2, records, cache_dir=a.cache, progress=False)
        models.append(("SmolLM2-135M-Instruct", "pretrained", Path(a.smollm2), records))
    rows = []
    for name, kind, path, records in models:
        model, tok = load_model(path)
        for seed in seeds:
            split, _ = split_clean(records, PurifyConfig(seed=seed))
            row = {"model": name, "kind": kind, "seed": seed, "n_records": len(split.holdout),
                   "perplexity_factor": round(fragility(model, tok, split.holdout, seed=seed), 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    frame = pd.DataFrame(rows)
    save_table(frame, "fragility", root=a.out,
               caption="Held-out perplexity x after re-initialising a random 5% of every MLP module's channels "
                       "(no repair; benchmarks/bench_fragility.py). purify run takes the pretrained recipe above 2.")
    for kind, part in frame.groupby("kind"):
        print(f"{kind}: x{part['perplexity_factor'].min():.2f} - x{part['perplexity_factor'].max():.2f} "
              f"over {len(part)} (model, seed)")


if __name__ == "__main__":
    main()
