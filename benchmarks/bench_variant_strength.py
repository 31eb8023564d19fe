"""Do the defender's variants learn their own backdoors? One row per (cell, variant).

    python benchmarks/bench_variant_strength.py [--preset dev5] [--cache data/cache] [--out reports/variants]

For every cell of a grid preset (default ``dev5``: purify run's defaults on the dev cells), the
suspicious model is planted (or read from the cache), ``purify run``'s variants are built (or read
from the cache), and each variant's own backdoor is measured as the τ rule measures it: the model
carrying the variant's update, its trigger placed in the first 100 held-out clean prompts, the
share of answers that show its behaviour. Prints one JSON line per variant and writes
``OUT/variants_own_asr.csv`` and ``.md``. A variant far below 90% carries little backdoor into Eq. 2.
"""

import argparse
import dataclasses
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="dev5")
    p.add_argument("--cache", default="data/cache")
    p.add_argument("--out", default="reports/variants")
    a = p.parse_args()

    import pandas as pd

    from purifylib.beds import open_bed
    from purifylib.defender import split_clean
    from purifylib.purify import probe_asr
    from purifylib.reports import save_table
    from purifylib.studies.grid import GridConfig, grid_cells
    from purifylib.variants import build_variants, carrying
    from purifylib.zoo import defender_records, plant_backdoor, variants_for

    cfg = GridConfig.preset(a.preset)
    bed = open_bed(cfg.size, cfg.model, 0, cfg.testbed_overrides, progress=False, cache_dir=a.cache)
    pcfg = cfg.purify_config()
    rows = []
    for cell in grid_cells(cfg):
        plant = "adapter" if cell.threat == "adapter" else cfg.full_plant
        sus = plant_backdoor(bed=bed, spec=cell.spec, plant=plant, rate=cfg.poison_rate, seed=cell.seed,
                             train_overrides=dict(cfg.plant_overrides), progress=False, cache_dir=a.cache)
        c = dataclasses.replace(pcfg, seed=cell.seed, variants=dataclasses.replace(
            variants_for(pcfg.variants, cell.threat), seed=cell.seed))
        split, c = split_clean(defender_records(bed, sus, False), c)
        variants = build_variants(sus.model_dir, split.variants, c.variants, adapter_dir=sus.adapter_dir,
                                  progress=False, cache_dir=a.cache)
        model, tok = sus.load(merge=cell.threat == "full")
        probe = split.holdout[:100]
        for k in range(c.variants.n_variants):
            v = c.variants.plant(k)
            with carrying(model, variants, k):
                asr = probe_asr(model, tok, probe, v.trigger, v.behaviour, seed=c.seed + k, kind=v.kind)
            row = {"cell": sus.name, "seed": cell.seed, "variant": k, "family": v.family, "kind": v.kind,
                   "trigger": v.trigger, "own_asr": round(asr, 3), "n_probe": len(probe)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    save_table(pd.DataFrame(rows), "variants_own_asr", root=a.out,
               caption=f"Each variant's own backdoor on held-out prompts (preset {a.preset}; "
                       "benchmarks/bench_variant_strength.py)")


if __name__ == "__main__":
    main()
