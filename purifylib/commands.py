"""What each ``purify`` subcommand does (``cmd_*``: one per stage, given the parsed arguments);
:mod:`purifylib.cli` parses the command line and turns errors into one line and an exit status.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from purifylib.errors import PurifyError


def _attack_sidecar(path: Path) -> Path:
    return path.with_name(path.stem + ".attack.json")


def cmd_testbed(a) -> int:
    from purifylib.outputs import check_output
    from purifylib.testbed import TestbedConfig, build_testbed

    check_output(a.out, existing_ok=True)  # an existing folder is reused only if it holds this very testbed

    bed = build_testbed(TestbedConfig(size=a.size, seed=a.seed), out=a.out, progress=not a.quiet,
                        prebuilt=not a.no_prebuilt)
    print(json.dumps({"base": str(bed.base_dir), "data": str(bed.data_dir), **bed.metrics}, indent=1))
    return 0


def cmd_poison(a) -> int:
    from purifylib.attacks import Behaviour, TriggerSpec, poison
    from purifylib.data import atomic_write_text, load_records, save_records
    from purifylib.outputs import check_output

    sidecar = _attack_sidecar(Path(a.out))
    for path in (a.out, sidecar):
        check_output(path, inputs=[a.data], kind="file")
    spec = TriggerSpec(attack=a.attack, triggers=tuple(a.trigger or ()),
                       behaviour=Behaviour(kind=a.behaviour_kind, target=a.behaviour or ""))
    clean = load_records(a.data)
    records = poison(clean, spec, rate=a.rate, seed=a.seed)
    save_records(records, a.out)
    atomic_write_text(sidecar, json.dumps({**spec.to_dict(), "rate": a.rate, "seed": a.seed}, indent=1))
    n = sum(r != o for r, o in zip(records, clean))
    print(f"wrote {a.out}: {len(records)} records, {n} changed ({spec.attack}, triggers {list(spec.triggers)})")
    return 0


def cmd_finetune(a) -> int:
    from purifylib.data import check_prompts, load_records, parse_json, read_text
    from purifylib.checkpoints import load_model, write_model
    from purifylib.outputs import check_output, staged_dir
    from purifylib.train import finetune
    from purifylib.zoo import plant_config

    check_output(a.out, inputs=[a.model, a.adapter, a.data])
    plant = "adapter" if a.lora and a.keep_adapter else "lora" if a.lora else "full"
    overrides = {k: v for k, v in (("epochs", a.epochs), ("lr", a.lr), ("batch_size", a.batch)) if v is not None}
    cfg = plant_config(plant, a.seed, **overrides)
    records = load_records(a.data)
    extra = {}
    sidecar = _attack_sidecar(Path(a.data))
    if sidecar.is_file():  # testbed convenience: carry the attack description to the model
        extra["attack.json"] = parse_json(read_text(sidecar), str(sidecar))
    model, tok = load_model(a.model, adapter=a.adapter, merge=a.adapter is None or not a.lora,
                            allow_pickle=a.allow_pickle, device=a.device)
    check_prompts(tok, records, a.data)
    with staged_dir(a.out) as tmp:  # made now: an unwritable --out fails before the training
        result = finetune(model, tok, records, cfg, progress=not a.quiet)
        write_model(result.model, tok, tmp, extra=extra)
    print(f"wrote {a.out}: {result.steps} steps, final loss {result.losses[-1]:.4f}")
    return 0


def cmd_evaluate(a) -> int:
    from purifylib.attacks import Behaviour, TriggerSpec
    from purifylib.data import check_prompts, finite_json, load_records, parse_json, read_text
    from purifylib.evaluate import evaluate_attack, evaluate_clean
    from purifylib.checkpoints import load_model

    records = load_records(a.data)
    kw = {"match": a.match, "ppl_records": load_records(a.ppl_data) if a.ppl_data else None}
    spec = None
    sidecar = Path(a.model) / "attack.json"
    if a.trigger or a.target:
        spec = TriggerSpec(attack=a.attack, triggers=tuple(a.trigger or ()),
                           behaviour=Behaviour(kind=a.behaviour_kind, target=a.target or ""))
    elif sidecar.is_file() and not a.clean_only:
        desc = parse_json(read_text(sidecar), str(sidecar))
        try:
            spec = TriggerSpec.from_dict(desc if isinstance(desc, dict) else {})
        except PurifyError as exc:
            raise PurifyError(f"{sidecar}: {exc}") from None
    model, tok = load_model(a.model, adapter=a.adapter, allow_pickle=a.allow_pickle, device=a.device)
    check_prompts(tok, records, a.data)
    if spec is None:
        metrics = evaluate_clean(model, tok, records, progress=not a.quiet, **kw).to_dict()
    else:
        metrics = {**evaluate_attack(model, tok, records, spec, seed=a.seed, progress=not a.quiet, **kw).to_dict(),
                   "attack": spec.to_dict()}
    if a.json:
        print(json.dumps(finite_json(metrics), indent=1, allow_nan=False))
    else:
        for k, v in metrics.items():
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    return 0


def cmd_run(a) -> int:
    import hashlib

    from purifylib.data import check_prompts, load_records, read_text
    from purifylib.checkpoints import load_model
    from purifylib.outputs import check_output, staged_dir
    from purifylib.cache import model_digest
    from purifylib.purify import purify, write_purified_into

    check_output(a.out, inputs=[a.model, a.adapter, a.clean_data, a.cache, a.config])
    cfg = run_config(a)
    if cfg.variants.threat == "adapter" and not a.adapter:
        raise PurifyError("--threat adapter needs --adapter DIR (the suspicious LoRA adapter)")
    clean = load_records(a.clean_data, need_output=False)
    inputs = {"model": str(a.model), "model_sha256": model_digest(a.model),
              "adapter": str(a.adapter) if a.adapter else None,
              "adapter_sha256": model_digest(a.adapter) if a.adapter else None,
              "clean_data": str(a.clean_data), "clean_records": len(clean),
              "clean_data_sha256": hashlib.sha256(read_text(a.clean_data).encode()).hexdigest()}
    # fail early, before any training: the checkpoint loads and its chat template formats every record
    _, tok = load_model(a.model, adapter=a.adapter, allow_pickle=False)
    check_prompts(tok, clean, a.clean_data)
    with staged_dir(a.out) as tmp:  # made now: an unwritable --out fails before the variants are trained
        result = purify(a.model, clean, cfg, adapter_dir=a.adapter, cache_dir=a.cache, progress=not a.quiet,
                        device=a.device, dtype=a.dtype)
        write_purified_into(result, tmp, inputs=inputs)
    m = result.metrics
    if result.fragility is not None:
        from purifylib.recipe import FRAGILITY_TAU

        print(f"fragility: re-initialising {FRAGILITY_TAU:.0%} random MLP channels multiplies held-out perplexity by "
              f"{result.fragility:.2f} (threshold {cfg.fragile_ppl:g}): "
              + ("the pretrained recipe ran (negation)" if result.recipe == "pretrained" else
                 f"the configured recipe ran ({result.config.neutral})"))
    print(f"wrote {a.out}: tau {result.tau:g}, held-out accuracy {m['suspicious']['accuracy']:.3f} -> "
          f"{m['purified']['accuracy']:.3f}, perplexity {m['suspicious']['perplexity']:.3f} -> "
          f"{m['purified']['perplexity']:.3f}, {result.timings['total']:.0f} s")
    return 0


def cmd_report(a) -> int:
    from purifylib.runreport import load_report, write_report

    load_report(a.run_dir)  # a bad folder fails before anything is written
    if a.to:
        from purifylib.outputs import check_output

        check_output(a.to, inputs=[a.run_dir], existing_ok=True)
    paths = write_report(a.run_dir, a.to)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


#: purify run's flags that set a PurifyConfig field (flag dest -> field), and those that set a VariantConfig one
RUN_FLAGS = {"tau": "tau", "strength": "strength", "neutral": "neutral", "alpha": "alpha", "heads": "heads",
             "utility": "utility", "prefer": "prefer", "n_holdout": "n_holdout", "repair_n": "repair_n",
             "repair_lr": "repair_lr", "repair_epochs": "repair_epochs", "repair_triggers": "repair_triggers",
             "repair_distill": "repair_distill", "learnt_asr": "learnt_asr", "fragile_ppl": "fragile_ppl", "seed": "seed"}
VARIANT_FLAGS = {"variants": "n_variants", "threat": "threat", "variant_set": "variants", "variant_lora": "lora",
                 "variant_epochs": "epochs", "seed": "seed"}


def run_config(a):
    """``purify run``'s :class:`~purifylib.recipe.PurifyConfig`: the defaults, then ``--config FILE`` (a
    YAML mapping of any of its fields, ``variants:`` a mapping of VariantConfig's), then the flags given.
    A recipe or flag that sets how the variants train (LoRA or not, rate, batch, epochs) is kept on a
    pretrained model too (``pretrained_lora`` off, unless the recipe sets it)."""

    from purifylib.recipe import PRETRAINED_VARIANTS, PurifyConfig
    from purifylib.variants import VariantConfig

    given = {}
    if a.config:
        import yaml

        from purifylib.data import read_text

        try:
            given = yaml.safe_load(read_text(a.config, "recipe file")) or {}
        except yaml.YAMLError as exc:
            raise PurifyError(f"{a.config}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(given, dict) or not isinstance(given.get("variants", {}), dict):
            raise PurifyError(f"{a.config}: expected a mapping of settings (and 'variants:' a mapping)")
    variants = dict(given.pop("variants", None) or {})
    for fields, cls, where in ((given, PurifyConfig, ""), (variants, VariantConfig, "variants: ")):
        bad = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)} - ({"variants"} if where else set()))
        if bad:
            raise PurifyError(f"{a.config}: {where}unknown setting(s) {', '.join(bad)}")
    if getattr(a, "tau", None) not in (None, "auto"):
        a.tau = _fraction(a.tau, "--tau")
    given.update({field: getattr(a, dest) for dest, field in RUN_FLAGS.items() if getattr(a, dest, None) is not None})
    variants.setdefault("seed", given.get("seed", 0))
    variants.update({field: getattr(a, dest) for dest, field in VARIANT_FLAGS.items()
                     if getattr(a, dest, None) is not None})
    if set(variants) & set(PRETRAINED_VARIANTS):  # the variants' training as the user set it, on any model
        given.setdefault("pretrained_lora", False)
    try:
        return PurifyConfig(variants=VariantConfig(**variants), **given)
    except TypeError as exc:  # a field of the wrong shape
        raise PurifyError(f"{a.config or 'purify run'}: {exc}") from None


def _fraction(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise PurifyError(f"{flag}: expected a number or 'auto', got '{text}'") from None


def cmd_import_gguf(a) -> int:
    from purifylib.checkpoints import find_smollm2_gguf, import_gguf
    from purifylib.outputs import check_output

    src = a.gguf or find_smollm2_gguf()
    check_output(a.out, inputs=[src])
    out = import_gguf(src, a.out)
    print(f"wrote {out} from {src}")
    return 0


def cmd_reproduce(a) -> int:
    import os

    from purifylib.checkpoints import runtime
    from purifylib.runner import run

    device, dtype = runtime(a.device, a.dtype)  # checked here, before any notebook starts
    os.environ.update(PURIFY_DEVICE=device, PURIFY_DTYPE=dtype)  # the notebooks' kernels inherit them
    run(a.preset, only=a.only, progress=not a.quiet)
    return 0


def cmd_grid(a) -> int:
    from purifylib.outputs import check_output
    from purifylib.reports import REPO_ROOT
    from purifylib.studies.grid import GridConfig, grid_cells, grid_folder, run_grid, tabulate_cells
    from purifylib.studies.grid_tables import git_commit, verdict, write_grid

    cfg = GridConfig.preset(a.preset)
    narrow = {k: tuple(v) for k, v in (("seeds", a.seeds), ("threats", a.threats)) if v is not None}
    for name, values in narrow.items():
        extra = [v for v in values if v not in getattr(cfg, name)]
        if extra or not values:
            raise PurifyError(f"--{name} {','.join(map(str, values)) or '(empty)'}: preset '{a.preset}' has "
                              f"{name} {','.join(map(str, getattr(cfg, name)))}")
    if narrow:  # a part of the preset (its cells keep their keys: a later full run reads them back)
        cfg = dataclasses.replace(cfg, **narrow)
    if a.pairs is not None:
        have = list(dict.fromkeys((c.attack, c.family) for c in grid_cells(cfg)))
        extra = [p for p in a.pairs if p not in have]
        if extra:
            raise PurifyError(f"--pairs {','.join(':'.join(p) for p in extra)}: preset '{a.preset}' has pairs "
                              f"{','.join(':'.join(p) for p in have)}")
        cfg = dataclasses.replace(cfg, pairs=tuple(a.pairs),
                                  paper_pairs=tuple(p for p in cfg.paper_pairs if p in a.pairs))
    if a.tables_only and a.hours is not None:
        raise PurifyError("--tables-only computes nothing: drop --hours")
    if a.hours is not None and a.hours <= 0:
        raise PurifyError(f"--hours must be > 0, got {a.hours}")
    out = Path(a.out) if a.out else REPO_ROOT / "reports" / grid_folder(a.preset)
    check_output(out, existing_ok=True)  # a rerun updates its own tables and appends to its log
    n = len(grid_cells(cfg))
    if not n:
        raise PurifyError(f"grid preset '{a.preset}' selects no cell")
    bed = f"the {cfg.size} testbed" if cfg.model is None else cfg.model
    print(f"grid {a.preset}: {n} cells x {len(cfg.defences)} defences on {bed} -> {out}", flush=True)
    cells = Path(a.cells) if a.cells else out / "cells"
    if a.cells:
        check_output(cells, existing_ok=True)
    if a.tables_only:  # no bed, no model: the committed rows as they are
        study = tabulate_cells(cfg, cells)
        if not study.rows:
            raise PurifyError(f"{cells}: no finished cell of preset '{a.preset}': nothing written")
    else:
        study = run_grid(cfg, cache_dir=a.cache, cells_dir=cells, hours=a.hours, progress=not a.quiet)
        if not study.rows:
            raise PurifyError(f"no cell finished within --hours {a.hours}: nothing written")
    write_grid(study, out, commit=git_commit(), note=a.note or "")
    for line in verdict(study.to_frame()):
        print(line)
    part = "" if study.cells_done == study.cells_total else f", partial: {study.cells_done} of {study.cells_total} cells"
    print(f"wrote {out} ({study.seconds:.0f} s{part})")
    return 0
