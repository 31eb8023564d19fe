"""One deterministic supervised fine-tuning loop, full weights or LoRA (peft).

The loss is next-token cross-entropy on the response tokens only (prompt tokens are masked with
-100), the Alpaca recipe: the prompt is the user message through the tokenizer's chat template,
the target is ``output`` followed by the end-of-turn token. AdamW, linear warm-up then cosine
decay, gradient clipping. Every random choice (initialisation of LoRA matrices, the order of
examples) comes from ``TrainConfig.seed``: same seed, same machine, identical weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from purifylib.data import chat_prompt
from purifylib.errors import PurifyError


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fine-tune. ``lora=True`` trains a LoRA adapter on ``lora_targets``."""

    epochs: float = 3.0
    lr: float = 1e-3
    batch_size: int = 32
    warmup: float = 0.1  # fraction of steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_length: int = 128
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: str | tuple = "all-linear"
    merge: bool = True  # merge a fresh LoRA adapter into the weights after training
    group_by_length: bool = False  # batches of similar length: less padding, less random batches
    prompt_loss: bool = False  # also learn the prompt tokens (language modelling, for pre-training)
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "lr", "warmup", "weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise PurifyError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.epochs > 0 and not self.max_steps:
            raise PurifyError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise PurifyError(f"learning rate must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise PurifyError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup < 1:
            raise PurifyError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.lora and (self.lora_r < 1 or self.lora_alpha <= 0):
            raise PurifyError(f"LoRA needs r >= 1 and alpha > 0, got r={self.lora_r} alpha={self.lora_alpha}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """The trained model (merged, or a peft model when an adapter is kept) and its loss curve."""

    model: object
    losses: list = field(default_factory=list)
    steps: int = 0

    def to_dict(self) -> dict:
        return {"steps": self.steps, "final_loss": self.losses[-1] if self.losses else None}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"step": range(1, len(self.losses) + 1), "loss": self.losses})


def encode_records(tokenizer, records: list[dict], max_length: int,
                   prompt_loss: bool = False) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record; labels are -100 on the prompt unless ``prompt_loss``."""
    prompts = [chat_prompt(tokenizer, r) for r in records]
    eos = tokenizer.eos_token or ""
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r["output"] + eos for r in records], add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(p_ids, r_ids):
        ids = (p + r)[:max_length]
        labels = ((p if prompt_loss else [-100] * len(p)) + r)[:max_length]
        out.append((ids, labels))
    return out


def collate(batch, pad_id: int, device):
    """Right-pad a list of (ids, labels) into tensors."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def distill_loss(logits, labels, t_logits, t_labels):
    """Mean KL(teacher ‖ student) over the answer tokens: row by row, the k-th answer token's
    next-token distribution under the student (``logits``, ``labels`` -100 off the answer) against
    the teacher's k-th (``t_logits``, ``t_labels``), for k up to the shorter of the two answers (the
    prompts may differ in length, the answers are the same)."""
    import torch

    s_rows, t_rows = [], []
    for i in range(labels.shape[0]):
        s_pos = (labels[i, 1:] != -100).nonzero().squeeze(-1)
        t_pos = (t_labels[i, 1:] != -100).nonzero().squeeze(-1)
        k = min(len(s_pos), len(t_pos))
        s_rows.append(logits[i, s_pos[:k]])
        t_rows.append(t_logits[i, t_pos[:k]])
    s_log = torch.log_softmax(torch.cat(s_rows).float(), -1)
    t_log = torch.log_softmax(torch.cat(t_rows).float(), -1)
    if s_log.shape[0] == 0:
        return logits.sum() * 0.0
    return (t_log.exp() * (t_log - s_log)).sum(-1).mean()


def length_grouped_batches(data, batch_size: int, gen, group: int = 32) -> list[list[int]]:
    """A seeded epoch of batches whose members have similar lengths (less padding, same data).

    Examples are shuffled, cut into groups of ``group`` batches, sorted by length inside a group,
    batched, and the batches shuffled again: the "group by length" sampler of common trainers.
    """
    import torch

    order = torch.randperm(len(data), generator=gen).tolist()
    batches = []
    span = batch_size * group
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: len(data[i][0]))
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def add_lora(model, cfg: TrainConfig):
    """Wrap ``model`` with a fresh LoRA adapter (seeded) on ``cfg.lora_targets``."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_targets if isinstance(cfg.lora_targets, str) else list(cfg.lora_targets)
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def finetune(model, tokenizer, records: list[dict], cfg: TrainConfig = TrainConfig(), *,
             progress: bool = True, desc: str = "fine-tune", teacher=None, teacher_records: list[dict] | None = None,
             distill: float = 1.0) -> TrainResult:
    """Fine-tune ``model`` on ``records`` in place and return it with its per-step losses.

    A plain model is trained in full, or through a new LoRA adapter when ``cfg.lora`` (merged
    back when ``cfg.merge``). A peft model (an existing adapter, the adapter-only threat model)
    keeps training its adapter and is returned as a peft model.

    With a ``teacher`` (a frozen model), the loss is ``(1 - distill)`` × the answers' cross-entropy plus
    ``distill`` × the KL divergence from the teacher's next-token distribution over the answer tokens, the
    teacher reading ``teacher_records`` (record by record the same answers, under prompts of its own;
    default ``records``): :func:`distill_loss`.
    """
    import torch
    from purifylib.progress import bar as tqdm

    if not records:
        raise PurifyError("no records to train on")
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    fresh_lora = cfg.lora and not isinstance(model, PeftModel)
    if fresh_lora:
        model = add_lora(model, cfg)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = encode_records(tokenizer, records, cfg.max_length, cfg.prompt_loss)
    if teacher is not None:
        if not 0 <= distill <= 1:
            raise PurifyError(f"distill must be a weight in [0, 1], got {distill}")
        teacher_records = records if teacher_records is None else teacher_records
        if len(teacher_records) != len(records):
            raise PurifyError(f"the teacher's records ({len(teacher_records)}) must pair with the records "
                              f"({len(records)})")
        t_data = encode_records(tokenizer, teacher_records, cfg.max_length)
        teacher.eval()

    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warm = int(cfg.warmup * total)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    losses: list[float] = []
    step = 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    while step < total:
        if cfg.group_by_length:
            epoch = length_grouped_batches(data, cfg.batch_size, gen)
        else:
            order = torch.randperm(len(data), generator=gen).tolist()
            epoch = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for batch in epoch:
            if step >= total:
                break
            ids, labels, mask = collate([data[i] for i in batch], pad_id, device)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            loss = out.loss
            if teacher is not None:
                t_ids, t_labels, t_mask = collate([t_data[i] for i in batch], pad_id, device)
                with torch.no_grad():
                    t_logits = teacher(input_ids=t_ids, attention_mask=t_mask).logits
                loss = (1 - distill) * loss + distill * distill_loss(out.logits, labels, t_logits, t_labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    bar.close()
    model.eval()
    if fresh_lora and cfg.merge:
        model = model.merge_and_unload()
    return TrainResult(model=model, losses=losses, steps=step)
