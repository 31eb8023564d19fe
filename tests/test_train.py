import pytest
import torch

from purifylib import PurifyError
from purifylib.evaluate import perplexity
from purifylib.checkpoints import load_model
from purifylib.train import TrainConfig, encode_records, finetune, length_grouped_batches


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_labels_mask_the_prompt(micro_model):
    _, tok = micro_model
    rec = {"instruction": "Copy the input exactly.", "input": "cat", "output": "cat"}
    ((ids, labels),) = encode_records(tok, [rec], 128)
    n_resp = sum(l != -100 for l in labels)
    assert tok.decode([t for t, l in zip(ids, labels) if l != -100]).strip() == "cat<|end|>"
    assert n_resp == len(tok("cat<|end|>", add_special_tokens=False)["input_ids"])


def test_length_grouping_covers_every_example_once():
    data = [([0] * (i % 17 + 1), [0]) for i in range(200)]
    batches = length_grouped_batches(data, 8, torch.Generator().manual_seed(0), group=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200))


@pytest.mark.parametrize("lora", [False, True])
def test_same_seed_same_weights_and_loss_goes_down(micro_bed, lora):
    records = micro_bed.split("defender")[:96]
    cfg = TrainConfig(epochs=2, lr=2e-3, batch_size=16, lora=lora, seed=5)
    runs = []
    for _ in range(2):
        model, tok = load_model(micro_bed.base_dir)
        before, ppl_before = _weights(model), perplexity(model, tok, records)
        res = finetune(model, tok, records, cfg, progress=False)
        runs.append((before, _weights(res.model), res.losses))
    (b0, w0, l0), (_, w1, l1) = runs
    assert perplexity(res.model, tok, records) < ppl_before  # it learned the training data
    assert l0 == l1
    assert w0.keys() == b0.keys()  # a LoRA run is merged back into plain weights
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w0[k], b0[k]) for k in w0)
    other = finetune(load_model(micro_bed.base_dir)[0], tok, records, TrainConfig(**{**cfg.to_dict(), "seed": 6}),
                     progress=False)
    assert other.losses != l0


def test_kept_adapter_trains_only_the_adapter(micro_bed):
    records = micro_bed.split("defender")[:32]
    model, tok = load_model(micro_bed.base_dir)
    res = finetune(model, tok, records, TrainConfig(epochs=1, batch_size=16, lora=True, merge=False), progress=False)
    assert hasattr(res.model, "peft_config")
    base = load_model(micro_bed.base_dir)[0].state_dict()
    merged = res.model.get_base_model().state_dict()
    frozen = [k for k in merged if "lora_" not in k and "base_layer" not in k and k in base]
    assert frozen and all(torch.equal(merged[k], base[k]) for k in frozen)


def test_config_validation():
    with pytest.raises(PurifyError, match="learning rate"):
        TrainConfig(lr=0)
    with pytest.raises(PurifyError, match="warmup"):
        TrainConfig(warmup=1.5)
    with pytest.raises(PurifyError, match="no records"):
        finetune(None, None, [], TrainConfig())


def test_distill_loss_is_zero_against_itself_and_aligns_answers_under_other_prompts(micro_bed):
    from purifylib.train import collate, distill_loss

    model, tok = load_model(micro_bed.base_dir)
    records = micro_bed.split("defender")[:4]
    longer = [{**r, "instruction": "Note: " + r["instruction"]} for r in records]
    ids, labels, mask = collate(encode_records(tok, records, 128), tok.pad_token_id, "cpu")
    t_ids, t_labels, t_mask = collate(encode_records(tok, longer, 128), tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        t_logits = model(input_ids=t_ids, attention_mask=t_mask).logits
    assert float(distill_loss(logits, labels, logits, labels)) == pytest.approx(0.0, abs=1e-6)
    # under another prompt the same answers are compared token by token: a small but non-zero divergence
    assert 0 < float(distill_loss(logits, labels, t_logits, t_labels)) < 5


def test_a_distilled_repair_brings_a_damaged_model_back_toward_its_teacher(micro_bed):
    from purifylib.train import collate, distill_loss

    records = micro_bed.split("defender")[:64]
    teacher, tok = load_model(micro_bed.base_dir)
    ids, labels, mask = collate(encode_records(tok, records[:16], 128), tok.pad_token_id, "cpu")

    def gap(m):
        with torch.no_grad():
            return float(distill_loss(m(input_ids=ids, attention_mask=mask).logits, labels,
                                      teacher(input_ids=ids, attention_mask=mask).logits, labels))

    model, _ = load_model(micro_bed.base_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * p.std() * 0.5)
    damaged = gap(model)
    cfg = TrainConfig(epochs=2, lr=1e-3, batch_size=16, seed=0)
    model = finetune(model, tok, records, cfg, progress=False, teacher=teacher).model
    assert gap(model) < 0.5 * damaged
    with pytest.raises(PurifyError, match="pair with"):
        finetune(model, tok, records, cfg, progress=False, teacher=teacher, teacher_records=records[:3])
    with pytest.raises(PurifyError, match="distill must be"):
        finetune(model, tok, records, cfg, progress=False, teacher=teacher, distill=1.5)
