"""Benchmark: build the testbed and plant the attack zoo; print time and backdoor quality.

    python benchmarks/bench_testbed.py [--size tiny] [--plants full lora] [--behaviours sentiment]

Prints the base model's build time and accuracy, then for each suspicious model ASR,
false-trigger and off-trigger rates and clean accuracy against the targets in
``purifylib.zoo.TARGETS``. Exits 0 whatever the numbers: it reports, it does not judge.
"""

import argparse
import time

import torch

from purifylib.attacks import ATTACKS
from purifylib.testbed import TestbedConfig, build_testbed
from purifylib.zoo import TARGETS, ZooConfig, evaluate_zoo, plant_backdoor


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    p.add_argument("--behaviours", nargs="+", default=["sentiment"])
    p.add_argument("--plants", nargs="+", default=["full", "lora"])
    p.add_argument("--n-eval", type=int, default=400)
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = ZooConfig(size=a.size, seed=a.seed, n_eval=a.n_eval,
                    entries=tuple((x, b, pl) for pl in a.plants for b in a.behaviours for x in a.attacks))
    t0 = time.time()
    bed = build_testbed(TestbedConfig(size=a.size, seed=a.seed))
    print(f"testbed {a.size}: {bed.metrics['params']:,} params, built in {bed.metrics['train_seconds']:.0f} s "
          f"(this call {time.time() - t0:.0f} s), accuracy {bed.metrics['accuracy']:.3f}")
    models = []
    for spec, plant in cfg.specs():
        t0 = time.time()
        models.append(plant_backdoor(bed, spec, plant=plant, rate=cfg.poison_rate, seed=a.seed))
        print(f"planted {models[-1].name} in {time.time() - t0:.0f} s", flush=True)
    res = evaluate_zoo(bed, models, n_eval=a.n_eval, seed=a.seed)
    df = res.to_frame()
    print(f"targets: {TARGETS}; base accuracy {res.base_accuracy:.3f}")
    cols = ["model", "asr", "false_trigger", "off_trigger", "clean_accuracy", "accuracy_drop", "meets_targets"]
    print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{int(df['meets_targets'].sum())} of {len(df)} meet every target")


if __name__ == "__main__":
    main()
