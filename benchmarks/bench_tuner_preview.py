"""How long one preview of the tuner (notebook 03's sliders) takes, on SmolLM2 or on the testbed.

    python benchmarks/bench_tuner_preview.py [--model data/models/smollm2-135m-instruct | --size tiny]
                                             [--n-probe 24,12,8] [--repeats 3] [--cache data/cache]

A preview applies the signature reversibly and generates answers to four probe sets of ``n_probe``
prompts each (clean, triggered, off-trigger, the held-out variant's triggered ones), then restores the
model; a fast preview leaves the off-trigger set (and the false-trigger one) out unless ``--sides``. Its time depends on the model and ``n_probe``, not on whether a backdoor is there, so the
suspicious model here is the bed's base model itself, with two small synthetic variants (cached) and the
neutralization ``purify run`` would take on it (negation of every head on a pretrained model,
re-initialisation on the testbed). Prints one JSON line per (n_probe, repeat): the preview's seconds,
the first of each n_probe including the one-off memoization of the variants' updates, and the tokens
one preview runs through the model (the padded prompt tokens of every probe batch, plus the generated
ones): on a CPU the preview's time is about those tokens times two multiply-adds per parameter. A fast
(teacher-forced) preview runs the prompts and the compared answers once, without generating, in two
passes (the probe sets under the edit together, then the held-out variant's), its shared chat-template
prefix once per pass and its output layer on the answer columns only, so it runs through fewer than
``tokens_at_most``.
"""

import argparse
import inspect
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="data/models/smollm2-135m-instruct",
                   help="a local checkpoint; '' for the testbed of --size")
    p.add_argument("--size", default="tiny", help="testbed size when --model is ''")
    p.add_argument("--n-probe", default="24,12,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--cache", default="data/cache")
    p.add_argument("--mode", choices=("both", "fast", "generate"), default="both",
                   help="teacher-forced previews (fast, a model over tuner.FAST_PARAMS), generating ones, or both")
    p.add_argument("--sides", action="store_true",
                   help="previews also measure the false- and off-trigger rates (a fast preview leaves them out)")
    a = p.parse_args()

    import torch

    from purifylib import tuner
    from purifylib.attacks import Behaviour, TriggerSpec
    from purifylib.beds import open_bed
    from purifylib.checkpoints import load_model
    from purifylib.evaluate import encode_prompts, generate
    from purifylib.models import head_geometry
    from purifylib.recipe import PRETRAINED_RECIPE
    from purifylib.neutralize import Neutralization
    from purifylib.signature import score
    from purifylib.variants import VariantConfig, build_variants
    from purifylib.zoo import Suspicious, defender_records

    real = bool(a.model)
    bed = open_bed(a.size, a.model or None, 0, {}, progress=False, cache_dir=a.cache)
    model, tok = load_model(bed.base_dir)
    sus = Suspicious(name="base", spec=None, plant="full", model_dir=bed.base_dir, adapter_dir=None)
    clean = defender_records(bed, sus, progress=False)
    vcfg = VariantConfig(n_variants=2, n_clean=20, epochs=1.0, variants="diverse",
                         **({"lora": True, "lr": 5e-3, "batch_size": 16} if real else {}))
    variants = build_variants(bed.base_dir, clean, vcfg, cache_dir=a.cache, progress=False)
    n_heads = head_geometry(model).n_heads
    n_params = sum(p.numel() for p in model.parameters())
    new_tokens = inspect.signature(generate).parameters["max_new_tokens"].default  # what a preview generates
    how = (Neutralization(way=PRETRAINED_RECIPE["neutral"], alpha=PRETRAINED_RECIPE["alpha"], heads=n_heads)
           if real else Neutralization())
    signature = score(model, variants, heads=bool(how.heads), progress=False)
    spec = TriggerSpec(attack="badnets", behaviour=Behaviour(kind="sentiment"))
    print(json.dumps({"model": str(bed.base_dir), "threads": torch.get_num_threads(), "neutralization": how.way,
                      "heads": how.heads, "tau": a.tau}), flush=True)
    modes = {"both": (False, True), "fast": (True,), "generate": (False,)}[a.mode]
    for n_probe, fast in ((int(n), f) for n in a.n_probe.split(",") for f in modes):
        t0 = time.time()
        state = tuner.prepare(model, tok, signature, variants, bed.split("test"), how=how, spec=spec,
                              n_probe=n_probe, match=bed.match, fast=fast, sides=a.sides or not fast)
        prepared = time.time() - t0
        sets = [state.prompts[k] for k in ("clean", "triggered", "off", "synthetic") if k != "off" or state.sides]
        tokens = sum(encode_prompts(tok, rs, "cpu")["input_ids"].numel() + (0 if fast else new_tokens * len(rs))
                     for rs in sets)
        for r in range(a.repeats):
            out = tuner.preview(state, tau=a.tau)
            print(json.dumps({"n_probe": n_probe, "fast": fast, "sides": state.sides, "probes_kept": len(state.clean), "repeat": r,
                              "prepare_s": round(prepared, 2), "preview_s": round(out["seconds"], 2),
                              "tokens_at_most": tokens, "gflop_at_most": round(2 * n_params * tokens / 1e9, 1),
                              "clean_accuracy": out["clean_accuracy"], "synthetic_asr": out["synthetic_asr"]}),
                  flush=True)


if __name__ == "__main__":
    main()
