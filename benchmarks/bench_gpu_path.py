"""Check: the whole purification path on a GPU (``--device cuda``, bfloat16), with timings.

    python benchmarks/bench_gpu_path.py [--device cuda] [--dtype bfloat16] [--size tiny]

Plants BadNets in the testbed's model, then runs ``purify`` (what ``purify run`` calls) twice, once
re-initialising the flagged channels and once negating the variants' difference (MLP channels and
every head, τ 100%), each on the device and dtype given, and prints for each: the τ chosen, ASR,
false/off-trigger rates and clean accuracy before and after on the test prompts, the wall time of
each stage and the peak GPU memory. Nothing here needs a download.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--n-eval", type=int, default=60)
    args = ap.parse_args()
    os.environ["PURIFY_DEVICE"], os.environ["PURIFY_DTYPE"] = args.device, args.dtype  # every load follows

    import torch

    from purifylib.attacks import TriggerSpec
    from purifylib.evaluate import evaluate_attack
    from purifylib.checkpoints import runtime
    from purifylib.purify import PurifyConfig, purify
    from purifylib.variants import VariantConfig
    from purifylib.testbed import TestbedConfig, build_testbed
    from purifylib.zoo import plant_backdoor

    device, dtype = runtime()
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    print(f"device {device} ({gpu}), dtype {dtype}, torch {torch.__version__}", flush=True)
    t = time.time()
    bed = build_testbed(TestbedConfig(size=args.size), progress=False)
    print(f"testbed {args.size}: {time.time() - t:.1f} s", flush=True)
    t = time.time()
    sus = plant_backdoor(bed, TriggerSpec("badnets"), progress=False)
    print(f"plant badnets: {time.time() - t:.1f} s", flush=True)
    test = bed.split("test")[:args.n_eval]
    model, tok = sus.load()
    before = evaluate_attack(model, tok, test, sus.spec).to_dict()
    print("suspicious:", json.dumps(before), flush=True)
    del model
    variants = VariantConfig(n_variants=2)
    runs = {"reinit (auto tau)": PurifyConfig(variants=variants, n_holdout=100, repair_n=1000),
            "negate (tau 1, heads, alpha 1.25)": PurifyConfig(variants=variants, n_holdout=100, repair_n=1000,
                                                              neutral="negate", alpha=1.25, tau=1.0,
                                                              heads=bed.config.spec["heads"])}
    for label, cfg in runs.items():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        res = purify(sus.model_dir, bed.split("defender"), cfg, progress=False)
        after = evaluate_attack(res.model, res.tokenizer, test, sus.spec).to_dict()
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
        where = {str(p.device) for p in res.model.parameters()}, {str(p.dtype) for p in res.model.parameters()}
        print(json.dumps({"run": label, "tau": res.tau, "after": after, "timings": res.timings,
                          "seconds": round(time.time() - t, 1), "peak_gpu_mib": round(peak, 1),
                          "model_on": sorted(where[0]), "model_dtype": sorted(where[1]), "notes": res.notes}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
