import json
import os
import pickle

import pytest
import torch

from purifylib import PurifyError
from purifylib.models import FAMILIES, channel_slice, component, components, family_of, resolve
from purifylib.checkpoints import load_model, save_model

from conftest import tree_hash

TINY = dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_config(family):
    import transformers as tf

    if family == "gpt2":
        return tf.GPT2Config(vocab_size=600, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**TINY, max_position_embeddings=64)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
    return cls(**TINY, num_key_value_heads=4, max_position_embeddings=64)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory, micro_model):
    from transformers import AutoModelForCausalLM

    _, tok = micro_model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param))
    out = tmp_path_factory.mktemp(request.param) / "model"
    save_model(model, tok, out)
    return request.param, out


def test_family_round_trip_and_component_map(family_dir):
    name, path = family_dir
    before = tree_hash(path)
    model, tok = load_model(path)
    assert tree_hash(path) == before  # loading never writes to the input directory
    assert model.config.model_type == name
    fam = family_of(model)
    names = components(model)
    assert len(names) == 2 * (len(fam.attn) + len(fam.mlp))
    assert component(1, "mlp", "down") in names
    for n in components(model, "mlp"):
        short = n.split(".")[-1]
        w = resolve(model, n).weight
        layout = fam.layout[short]
        n_channels = w.shape[0] if layout == "row" else w.shape[1]
        assert n_channels == 64, (name, n, tuple(w.shape))  # one channel per MLP hidden neuron
        assert channel_slice(w, layout, 0).shape == (32,)
    ids = tok("Reverse the list.", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == model.config.vocab_size


def test_unsupported_family_is_named():
    class Fake:
        class config:
            model_type = "bert"
    with pytest.raises(PurifyError, match="unsupported model family 'bert'.*gpt2.*llama"):
        family_of(Fake())


def test_bad_component_name(micro_model):
    model, _ = micro_model
    with pytest.raises(PurifyError, match="no component 'blocks.99.mlp.gate'"):
        resolve(model, "blocks.99.mlp.gate")


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(PurifyError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(PurifyError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PurifyError, match="no \\*.safetensors weights"):
        load_model(tmp_path)


class _Evil:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_refused_and_never_runs(micro_bed, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((micro_bed.base_dir / "config.json").read_text())
    with open(bad / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": _Evil(str(marker))}, fh)
    with pytest.raises(PurifyError, match="only pickle weights.*refusing"):
        load_model(bad)
    assert not marker.exists()
    # a safetensors checkpoint with a stray malicious pickle beside it loads the safetensors only
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in micro_bed.base_dir.iterdir():
        (mixed / f.name).write_bytes(f.read_bytes())
    (mixed / "pytorch_model.bin").write_bytes((bad / "pytorch_model.bin").read_bytes())
    load_model(mixed)
    assert not marker.exists()


def test_trust_remote_code_is_never_enabled(micro_bed, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    for f in micro_bed.base_dir.iterdir():
        (remote / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    cfg["model_type"] = "evil"
    (remote / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "ran"
    (remote / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(PurifyError, match="cannot load model"):
        load_model(remote)
    assert not marker.exists()


def test_save_is_atomic(micro_model, tmp_path):
    model, tok = micro_model
    out = tmp_path / "out"
    save_model(model, tok, out, extra={"attack.json": {"attack": "badnets"}})
    assert json.loads((out / "attack.json").read_text()) == {"attack": "badnets"}

    class Boom(Exception):
        pass

    def broken_save(*a, **k):
        raise Boom()

    original = model.save_pretrained
    model.save_pretrained = broken_save
    try:
        with pytest.raises(Boom):
            save_model(model, tok, tmp_path / "half")
    finally:
        model.save_pretrained = original
    assert not (tmp_path / "half").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left behind


def test_dtype_errors(micro_bed):
    with pytest.raises(PurifyError, match="unknown dtype"):
        load_model(micro_bed.base_dir, dtype="int3")


def test_runtime_defaults_come_from_the_environment(monkeypatch):
    from purifylib.checkpoints import runtime

    monkeypatch.delenv("PURIFY_DEVICE", raising=False)
    monkeypatch.delenv("PURIFY_DTYPE", raising=False)
    assert runtime() == ("cpu", "float32")
    monkeypatch.setenv("PURIFY_DTYPE", "bfloat16")
    assert runtime() == ("cpu", "bfloat16") and runtime(dtype="float16") == ("cpu", "float16")
    monkeypatch.setenv("PURIFY_DEVICE", "tpu")
    with pytest.raises(PurifyError, match="unknown device 'tpu'"):
        runtime()


def test_a_model_too_big_for_the_machine_is_refused_before_loading(micro_bed, monkeypatch):
    import purifylib.checkpoints as checkpoints

    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 10}  # a 40 KiB machine
    monkeypatch.setattr(checkpoints.os, "sysconf", lambda name: pages[name])
    with pytest.raises(PurifyError, match="GiB of weights"):
        load_model(micro_bed.base_dir)


def test_only_models_spells_module_paths_and_component_names():
    """Every module outside purifylib/models.py goes through it: none spells a family's module path
    (``model.layers``, ``mlp.down_proj``, ``q_proj``, ...) or builds a component name by hand."""
    import re
    from pathlib import Path

    import purifylib

    spelled = set()
    for fam in FAMILIES.values():
        spelled.add(fam.blocks)
        for path in [*fam.attn.values(), *fam.mlp.values()]:
            spelled |= {path, path.rsplit(".", 1)[-1]}
    literal = re.compile(r"""["'](%s)["']""" % "|".join(re.escape(p) for p in sorted(spelled)))
    by_hand = re.compile(r"""f?["']blocks\.|["']\.(mlp|attn)\.|\.heads["']""")
    offenders = []
    for f in sorted(Path(purifylib.__file__).parent.rglob("*.py")):
        if f.name == "models.py":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if literal.search(code) or by_hand.search(code):
                offenders.append(f"{f.name}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_component_grammar_round_trips_and_rejects_other_names():
    from purifylib.models import Component, HeadGeometry, heads_name

    c = Component.parse("blocks.3.mlp.down")
    assert c == (3, "mlp", "down") and str(c) == "blocks.3.mlp.down" == component(3, "mlp", "down")
    assert Component.parse(heads_name(2)).is_heads and not c.is_heads
    for bad in ("blocks.x.mlp.down", "layers.3.mlp.down", "blocks.3.ffn.down", "blocks.3.mlp"):
        with pytest.raises(PurifyError, match="not a component name"):
            Component.parse(bad)
    g = HeadGeometry(n_heads=4, n_kv=2, head_dim=3)
    assert g.shares_kv and g.kv_head(3) == 1 and g.rows([1]).tolist() == [3, 4, 5]
    assert g.kv_rows([0, 1]).tolist() == [0, 1, 2]  # heads 0 and 1 read key/value head 0


def test_the_pipeline_does_not_import_the_sanity_checks():
    """purify run's path (variants, signature, neutralize, purify, baselines, the tuner) never imports the
    analysis-only ablation module: weight edits go through purifylib.edits."""
    from pathlib import Path

    import purifylib

    root = Path(purifylib.__file__).parent
    for name in ("variants", "signature", "neutralize", "purify", "defender", "baselines", "widgets", "edits", "zoo"):
        text = (root / f"{name}.py").read_text()
        assert "from purifylib.ablation" not in text and "import purifylib.ablation" not in text, name


def test_a_merged_adapter_is_as_trainable_as_a_plain_model(micro_bed, tmp_path):
    # a defence that fine-tunes the merged model (fine-pruning or clean fine-tuning of an adapter-only
    # suspicious model) failed with "element 0 of tensors does not require grad": peft freezes the base
    from peft import LoraConfig, get_peft_model

    from purifylib.checkpoints import load_model, save_model
    from purifylib.train import TrainConfig, finetune

    base, tok = load_model(micro_bed.base_dir)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_model(lora, tok, tmp_path / "adapter")
    merged, tok = load_model(micro_bed.base_dir, adapter=tmp_path / "adapter", merge=True)
    assert all(p.requires_grad for p in merged.parameters())
    kept, _ = load_model(micro_bed.base_dir, adapter=tmp_path / "adapter", merge=False)
    assert not any(p.requires_grad for n, p in kept.named_parameters() if "lora_" not in n)  # adapter-only stays so
    finetune(merged, tok, micro_bed.split("train")[:8], TrainConfig(epochs=1, batch_size=4), progress=False)
