"""`purify run`'s pipeline on every supported model family (tiny random configs saved to disk)."""

import pytest
import torch

from purifylib.models import FAMILIES, components, resolve
from purifylib.checkpoints import load_model
from purifylib.purify import PurifyConfig, purify
from purifylib.variants import VariantConfig

QUICK = PurifyConfig(variants=VariantConfig(n_variants=2, n_clean=24, epochs=1.0, batch_size=16), tau=0.1,
                     n_holdout=16, repair_n=32)


def _config(family: str, vocab: int, eos: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=256, **common)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=256, **common)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_purify_runs_on_every_family(family, micro_bed, tmp_path):
    from transformers import AutoModelForCausalLM

    from purifylib.checkpoints import load_tokenizer

    tok = load_tokenizer(micro_bed.base_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok), tok.eos_token_id))
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    tok.save_pretrained(tmp_path / "model")
    loaded, _ = load_model(tmp_path / "model")
    assert loaded.config.model_type == family and components(loaded, "mlp")
    res = purify(tmp_path / "model", micro_bed.split("defender"), QUICK, cache_dir=tmp_path / "cache", progress=False)
    sig = res.signature
    assert res.fragility > 0 and res.recipe in ("configured", "pretrained")  # measured on every family's layout
    assert len(sig.mlp_modules) == 2 * len(FAMILIES[family].mlp)
    # the purified model's flagged channels differ from the suspicious model's
    name = sig.mlp_modules[0]
    before = resolve(loaded, name).weight.detach()
    after = resolve(res.model, name).weight.detach()
    idx = res.neutralization.flagged(sig, name).to(before.device)
    dim = 0 if sig.layouts[name] == "row" else 1
    assert not torch.equal(before.index_select(dim, idx), after.index_select(dim, idx))
    assert 0 <= res.metrics["purified"]["accuracy"] <= 1


def test_negation_with_every_head_on_shared_keys_and_values(micro_bed, tmp_path):
    """Llama with one key/value head shared by two query heads: negate edits k/v too, reinit does not."""
    from transformers import AutoModelForCausalLM

    from purifylib.checkpoints import load_tokenizer
    from purifylib.neutralize import Neutralization, Neutralizer
    from purifylib.signature import score
    from purifylib.variants import build_variants

    tok = load_tokenizer(micro_bed.base_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("llama", len(tok), tok.eos_token_id))
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    tok.save_pretrained(tmp_path / "model")
    loaded, _ = load_model(tmp_path / "model")
    variants = build_variants(tmp_path / "model", micro_bed.split("defender"), QUICK.variants,
                              cache_dir=tmp_path / "cache", progress=False)
    sig = score(loaded, variants, heads=True, progress=False)
    how = Neutralization(tau=1.0, heads=2)
    k = resolve(loaded, "blocks.0.attn.k").weight
    k0 = k.detach().clone()
    for neutral, moves in (("reinit", False), ("negate", True)):
        n = Neutralizer(loaded, sig, how.replace(way=neutral), variants=variants)
        n.set_strength(1.0)
        assert (not torch.equal(k.detach(), k0)) == moves, neutral
        n.restore()
    n = Neutralizer(loaded, sig, how.replace(way="negate", alpha=1.0), variants=variants)
    n.set_strength(1.0)
    mean = sum(variants.update(i, "bd").delta("blocks.0.attn.k") - variants.update(i, "clean").delta("blocks.0.attn.k")
               for i in range(2)) / 2
    torch.testing.assert_close(k.detach(), k0 - mean.to(k0.device, k0.dtype))
