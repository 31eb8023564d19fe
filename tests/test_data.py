import json

import pytest

from purifylib import PurifyError
from purifylib.data import chat_prompt, load_records, save_records, user_message


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_round_trip_json_and_jsonl(tmp_path):
    recs = [{"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Copy.", "input": "a b", "output": "a b"}]
    for name in ("d.json", "d.jsonl"):
        save_records(recs, tmp_path / name)
        assert load_records(tmp_path / name) == recs


def test_missing_input_defaults_to_empty(tmp_path):
    p = write(tmp_path, "d.json", json.dumps([{"instruction": "x", "output": "y"}]))
    assert load_records(p) == [{"instruction": "x", "input": "", "output": "y"}]


@pytest.mark.parametrize("text, needle", [
    ("[", "invalid JSON at line 1"),
    ("[]", "no records"),
    ('{"instruction": "x"}', "expected a JSON list"),
    ('[{"instruction": "x", "output": "y"}, {"instruction": "x"}]', "record 1: missing field 'output'"),
    ('[{"instruction": 3, "output": "y"}]', "record 0: field 'instruction' must be a string"),
    ('[{"instruction": "  ", "output": "y"}]', "record 0: field 'instruction' is empty"),
    ('["x"]', "record 0: expected an object"),
])
def test_bad_files_name_file_record_and_field(tmp_path, text, needle):
    p = write(tmp_path, "bad.json", text)
    with pytest.raises(PurifyError) as exc:
        load_records(p)
    msg = str(exc.value)
    assert "bad.json" in msg and needle in msg and "\n" not in msg


def test_bad_jsonl_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(PurifyError, match="bad.jsonl: line 2: invalid JSON"):
        load_records(p)


def test_missing_file(tmp_path):
    with pytest.raises(PurifyError, match="no such file"):
        load_records(tmp_path / "nope.json")


def test_save_is_atomic_on_bad_record(tmp_path):
    out = tmp_path / "out.json"
    with pytest.raises(PurifyError):
        save_records([{"instruction": "ok", "output": "y"}, {"output": "no instruction"}], out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_prompt_convention(micro_model):
    _, tok = micro_model
    rec = {"instruction": "Copy the input exactly.", "input": "cat dog", "output": "cat dog"}
    assert user_message(rec) == "Copy the input exactly.\ncat dog"
    assert user_message(dict(rec, input="")) == "Copy the input exactly."
    prompt = chat_prompt(tok, rec)
    assert prompt == tok.apply_chat_template([{"role": "user", "content": "Copy the input exactly.\ncat dog"}],
                                             tokenize=False, add_generation_prompt=True)
    assert "cat dog" in prompt
