"""Does the testbed reach the same quality whatever the machine's arithmetic? Build it several ways.

    python benchmarks/bench_testbed_robustness.py --size tiny --threads 1 2 --seeds 0 1 [--steps 3000 6000]

Each build runs in a process of its own with its own thread count (the order of float sums changes
with it, as it does between processors) and its own cache folder, and prints one JSON line: size,
steps, seed, threads, clean exact-match accuracy, perplexity, seconds. Quality that moves by more
than about two points between thread counts for the same seed is a testbed that is not trained to a
stable point: its numbers are one machine's draw.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

BUILD = """
import json, sys, time, torch
torch.set_num_threads({threads})
from purifylib.testbed import TestbedConfig, build_testbed
t = time.time()
over = (("steps", {steps}),) if {steps} else ()
bed = build_testbed(TestbedConfig(size={size!r}, seed={seed}, overrides=over), cache_dir={cache!r}, progress=False,
                    prebuilt=False)
print(json.dumps({{"size": {size!r}, "steps": {steps} or None, "seed": {seed}, "threads": {threads},
                  "accuracy": bed.metrics["accuracy"], "perplexity": round(bed.metrics["perplexity"], 4),
                  "seconds": round(time.time() - t, 1)}}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, nargs="+", default=[0], help="pre-training steps (0: the size's own)")
    a = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="purify-robustness-")
    for steps in a.steps:
        for seed in a.seeds:
            for threads in a.threads:
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                cache = os.path.join(root, f"{a.size}-{steps}-{seed}-{threads}")
                code = BUILD.format(threads=threads, steps=steps, size=a.size, seed=seed, cache=cache)
                out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
                print(out.stdout.strip() or json.dumps({"error": out.stderr.strip().splitlines()[-1:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
