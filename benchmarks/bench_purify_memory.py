"""Benchmark: peak memory of each stage of ``purify run`` on a real checkpoint, against its size.

    python benchmarks/bench_purify_memory.py [--model data/models/smollm2-135m-instruct]
                                             [--full-variants] [--variants 2] [--n-clean 10]

Runs the purification pipeline (``purifylib.purify.purify``, what ``purify run`` calls) with small
data on the model (default: SmolLM2-135M-Instruct from ``make smollm2``) and the shipped
instructions, which the model answers itself. A thread samples the process's resident memory
every 20 ms; each sample is charged to the stage running then (freed memory is handed back to the
system between stages, glibc's ``malloc_trim``). Printed per stage: wall time, peak
resident memory, and that peak over the model's size (parameters × bytes per parameter). Variants
are LoRA adapters by default (the ``real`` preset's); ``--full-variants`` makes them full
fine-tunes, whose stored updates are one model-sized file per variant side.
"""

import argparse
import ctypes
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Sampler(threading.Thread):
    """Resident memory (from /proc/self/statm) sampled every ``interval`` s, by stage."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.page = interval, os.sysconf("SC_PAGE_SIZE")
        self.current, self.started, self.stop_flag = "start", time.time(), False
        self.peaks, self.seconds = {}, {}
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc: peaks then include memory kept from earlier stages
            self.libc = None

    def rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def stage(self, name: str):
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), self.rss())
        # hand freed memory back to the system, so a stage is not charged with its predecessor's
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        self.seconds[self.current] = time.time() - self.started
        self.current, self.started = name, time.time()

    def run(self):
        while not self.stop_flag:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), self.rss())
            time.sleep(self.interval)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "data" / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--variants", type=int, default=2)
    ap.add_argument("--n-clean", type=int, default=10)
    ap.add_argument("--full-variants", action="store_true")
    a = ap.parse_args()
    if not (Path(a.model) / "config.json").is_file():
        print(f"{a.model}: no checkpoint (run `make smollm2` first)", file=sys.stderr)
        return 1

    import torch

    from purifylib.data import load_records
    from purifylib.checkpoints import load_model
    from purifylib.purify import PurifyConfig, purify
    from purifylib.realbed import DATA
    from purifylib.variants import VariantConfig

    model, _ = load_model(a.model)
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    del model
    n_holdout = 16
    records = load_records(DATA / "instructions.jsonl", need_output=False)
    records = records[:n_holdout + a.variants * a.n_clean + 16]
    vc = VariantConfig(n_variants=a.variants, n_clean=a.n_clean, epochs=1.0, batch_size=8,
                       lora=not a.full_variants, lr=1e-3 if a.full_variants else 2e-3)
    cfg = PurifyConfig(variants=vc, n_holdout=n_holdout, repair_n=16, tau_grid=(0.05, 0.2), answer_tokens=24)
    sampler = Sampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as cache:
        purify(a.model, records, cfg, cache_dir=cache, progress=False, on_stage=sampler.stage)
    sampler.stop_flag = True
    sampler.join()
    print(f"model {a.model}: {n_params / 1e6:.1f} M parameters, {size / 2**20:.0f} MiB in "
          f"{dtype}; torch threads {torch.get_num_threads()}; "
          f"variants: {a.variants} x {'full fine-tunes' if a.full_variants else 'LoRA'}, {a.n_clean} clean records each")
    print(f"{'stage':<20}{'seconds':>9}{'peak RSS MiB':>14}{'x model':>9}")
    for s, seconds in sampler.seconds.items():  # the stages in the order they ran
        if s != "start":
            print(f"{s:<20}{seconds:>9.1f}{sampler.peaks[s] / 2**20:>14.0f}{sampler.peaks[s] / size:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
