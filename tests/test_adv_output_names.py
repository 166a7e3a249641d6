"""The output side of `runner run-batch` (adversarial pass 191): what cannot be written is refused before the run."""

import json

from helpers import invoke, write_jsonl


def test_run_batch_refuses_an_errors_file_name_too_long_before_the_run(tmp_path, tiny_gpt2):
    """`-o` with a legal 250-byte name whose default errors file (`.errors` inserted) is over the 255 bytes a
    file name may have: the whole batch ran, then its export failed ("cannot read ...: File name too long"),
    and so did every run again, so its output could never be written. Refused before anything runs, naming
    the file, as the other problems of the output are (adversarial pass 191)."""
    request = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
               "body": {"model": "tiny", "prompt": "Every student", "max_tokens": 2}}  # fmt: skip
    inp = write_jsonl(tmp_path / "in.jsonl", [request])
    out = tmp_path / ("x" * 244 + ".jsonl")
    result = invoke("run-batch", "-i", inp, "-o", out, "--model", tiny_gpt2, "--served-model-name", "tiny")
    assert result.exit_code != 0, result.output
    assert ".errors.jsonl" in result.output and "255" in result.output, result.output
    assert not out.with_name(out.name + ".job").exists(), "the batch ran before its output was refused"
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]
    assert json.loads(inp.read_text()) == request
