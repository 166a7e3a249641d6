"""Adversarial kills of the commands other than `runner work` (retry, cancel, repair, results, submit, run)."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import write_jsonl
from workers import run_runner


@pytest.mark.slow
def test_a_killed_openai_export_leaves_no_copy_of_its_output_in_the_temp_folder(tmp_path, tiny_gpt2):
    """openai_batch.export stages both files in a temp folder, and a SIGKILL runs no cleanup: each killed export
    left a copy of its whole output in $TMPDIR (local disk on Colab). The folder names its process, and the next
    export removes those of processes that have ended (pass 180)."""
    reqs = write_jsonl(tmp_path / "b.jsonl", ({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                              "body": {"model": "m", "prompt": "the old man", "max_tokens": 2}}
                                             for i in range(2)))  # fmt: skip
    home, scratch = tmp_path / "home", tmp_path / "scratch"
    scratch.mkdir()
    code, out = run_runner("--home", home, "submit", reqs, "-m", tiny_gpt2, "--served-model-name", "m",
                           "--name", "b")  # fmt: skip
    assert code == 0, out
    code, out = run_runner("--home", home, "work")
    assert code == 0, out
    env = {"TMPDIR": str(scratch), "RUNNER_FAULT": "mid_write:2"}
    code, out = run_runner("--home", home, "results", "b", "--format", "openai", "--to", tmp_path / "o.jsonl",
                           env_extra=env)  # fmt: skip
    assert code == -signal.SIGKILL, out
    code, out = run_runner("--home", home, "results", "b", "--format", "openai", "--to", tmp_path / "o.jsonl",
                           env_extra={"TMPDIR": str(scratch)})  # fmt: skip
    assert code == 0, out
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    assert [json.loads(x) for x in (tmp_path / "o.errors.jsonl").read_text().splitlines()] == []
    assert not list(scratch.iterdir()), "a killed export's staged files are left in the temp folder"
