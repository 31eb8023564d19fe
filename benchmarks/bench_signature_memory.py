"""Benchmark: peak memory of building a signature against model size, for N = 2, 4, 8 variants.

    python benchmarks/bench_signature_memory.py [--hidden 64 256 512] [--layers 8] [--ns 2 4 8]

For each model size a Llama model with random weights is made, and N full-weight variant pairs
with random updates are written to disk (what ``build_variants`` writes). Each measurement runs
in a fresh process: load the model (one copy), then ``signature.score`` over the N variants.
Printed per row: model size, one module's N differences, and the peak resident memory of the
process above what it held before scoring. Scoring streams one module at a time, so that figure
should stay near one module's N differences and not grow with N times the model.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def make_model(hidden: int, layers: int, out: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out / "model", safe_serialization=True)
    return model


def make_variants(model, n: int, root: Path):
    import torch
    from safetensors.torch import save_file

    from purifylib.models import components, resolve

    where = {id(resolve(model, c).weight): c for c in components(model)}
    g = torch.Generator().manual_seed(1)
    dirs = []
    for i in range(n):
        d = root / f"variant{i}"
        d.mkdir(parents=True)
        for which in ("bd", "clean"):
            tensors, meta = {}, {}
            for key, p in model.named_parameters():
                tensors[f"param::{key}"] = torch.randn(p.shape, generator=g) * 1e-3
                if id(p) in where:
                    meta[where[id(p)]] = {"param": key}
            save_file(tensors, str(d / f"{which}.safetensors"), metadata={"modules": json.dumps(meta)})
        (d / "variant.json").write_text(json.dumps({"trigger": f"T{i}", "behaviour": "x", "seconds": 0}))
        dirs.append(d)
    return dirs


def _rss_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(model_dir: str, variant_dirs: list, n: int) -> dict:
    """Run in a child process: peak RSS growth while scoring."""
    from transformers import AutoModelForCausalLM

    from purifylib.signature import score
    from purifylib.variants import Variants, VariantConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir)  # weights only: no tokenizer is needed to score
    import gc

    gc.collect()
    before = _rss_kb("VmRSS")
    try:  # reset the peak (VmHWM) so that loading's transient does not count
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    variants = Variants(root=Path(variant_dirs[0]).parent, config=VariantConfig(n_variants=n),
                        dirs=[Path(d) for d in variant_dirs[:n]])
    score(model, variants, progress=False)
    peak = _rss_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"before_mb": before / 1024, "peak_mb": peak / 1024}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8])
    a = p.parse_args()
    print(f"{'hidden':>6} {'params':>11} {'model MB':>9} {'N':>3} {'N·module MB':>12} {'peak−before MB':>15}")
    for hidden in a.hidden:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = make_model(hidden, a.layers, tmp)
            n_params = sum(p.numel() for p in model.parameters())
            dirs = make_variants(model, max(a.ns), tmp / "variants")
            module_mb = 4 * hidden * 4 * hidden * 4 / 2**20  # one MLP weight, float32
            for n in a.ns:
                out = subprocess.run([sys.executable, __file__, "--child", str(tmp / "model"),
                                      json.dumps([str(d) for d in dirs]), str(n)], capture_output=True, text=True,
                                     env={**os.environ, "TQDM_DISABLE": "1"})
                if out.returncode:
                    sys.exit(out.stderr)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{hidden:>6} {n_params:>11,} {n_params * 4 / 2**20:>9.1f} {n:>3} {n * module_mb:>12.1f} "
                      f"{r['peak_mb'] - r['before_mb']:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
