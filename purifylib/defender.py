"""The defender's clean data: answered where it has no answers, then split for one purification.

Records without an answer (``output`` empty or missing: instructions only, the usual case with a
real model) are answered by the suspicious model itself (greedy, cached under ``answers`` of the
cache root). The data is then shuffled with the seed and split into a held-out slice (the τ rule
and clean accuracy are measured on it, never trained on), ``N`` disjoint slices for the variants,
and the repair records.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass

from purifylib.errors import PurifyError


def answer_missing(model_dir, records: list[dict], *, adapter_dir=None, threat: str = "full", max_new_tokens: int = 40,
                   cache_dir=None, progress: bool = True, device: str | None = None, dtype: str | None = None) -> tuple[list, int]:
    """``records`` with every empty ``output`` answered by the suspicious model itself; and how many were.

    Cached under ``<cache>/answers`` by the digests of the model's weights and of the records, so the
    studies that share a suspicious model answer once.
    """
    from purifylib import cache
    from purifylib.checkpoints import load_model
    from purifylib.data import atomic_write_text
    from purifylib.evaluate import self_answer

    n = sum(not r["output"].strip() for r in records)
    if n == 0:
        return records, 0
    key = cache.digest({"model": cache.model_digest(model_dir, adapter_dir), "threat": threat,
                        "tokens": max_new_tokens, "records": cache.records_digest(records)}, 16)
    path = cache.folder("answers", cache_dir) / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text()), n
    model, tok = load_model(model_dir, adapter=adapter_dir, merge=True, device=device, dtype=dtype)
    out = self_answer(model, tok, records, max_new_tokens=max_new_tokens, progress=progress,
                      desc="answer the clean data with the suspicious model")
    atomic_write_text(path, json.dumps(out))
    return out, n


@dataclass
class Split:
    holdout: list
    variants: list  # the records the variants' slices are taken from, in order
    repair: list  # the purification's repair records (with the variants' own triggers, if the config says so)
    clean_repair: list = None  # the same records as they are (what a baseline fine-tunes on)

    def __post_init__(self):
        if self.clean_repair is None:
            self.clean_repair = self.repair


#: at most this share of the defender's data is held out (``n_holdout`` is the cap): with a few hundred
#: records, 200 held out would leave the variants a dozen records each, too few to learn a backdoor
HOLDOUT_SHARE = 0.2


def holdout_size(n_records: int, n_holdout: int) -> int:
    """How many of ``n_records`` are held out: ``n_holdout``, or :data:`HOLDOUT_SHARE` of them if that is less."""
    return max(1, min(n_holdout, int(n_records * HOLDOUT_SHARE)))


def split_clean(clean: list[dict], cfg) -> tuple[Split, object]:
    """Shuffle (seeded) and split the defender's data for ``cfg`` (a :class:`~purifylib.recipe.PurifyConfig`);
    hold out :func:`holdout_size` records and shrink ``n_clean`` per variant if it must (the returned
    config says both)."""
    vc = cfg.variants
    n_hold = holdout_size(len(clean), cfg.n_holdout)
    if len(clean) < n_hold + vc.n_variants * 10:
        raise PurifyError(f"the clean data has {len(clean)} records; {n_hold} held out plus "
                          f"{vc.n_variants} variants need at least {n_hold + vc.n_variants * 10}")
    order = list(range(len(clean)))
    random.Random(cfg.seed).shuffle(order)
    shuffled = [clean[i] for i in order]
    holdout, rest = shuffled[:n_hold], shuffled[n_hold:]
    if n_hold != cfg.n_holdout:
        cfg = dataclasses.replace(cfg, n_holdout=n_hold)
    n_clean = min(vc.n_clean, len(rest) // vc.n_variants)
    if n_clean != vc.n_clean:
        cfg = dataclasses.replace(cfg, variants=dataclasses.replace(vc, n_clean=n_clean))
    used = vc.n_variants * n_clean
    left = rest[used:]
    repair = left[:cfg.repair_n] if len(left) >= cfg.repair_n else (left + rest[:used])[:cfg.repair_n]
    from purifylib.variants import with_own_triggers

    return Split(holdout=holdout, variants=rest[:used], clean_repair=repair,
                 repair=with_own_triggers(repair, cfg.variants, cfg.repair_triggers, cfg.seed)), cfg
