"""File and folder names whose bytes are not UTF-8 (Python holds them as surrogates, '\\udcff'). pyarrow encodes
a path as UTF-8 and raised UnicodeEncodeError from deep inside it: a Parquet or CSV prompt file so named, a job
home so named, and `runner results --to` such a name each ended in a traceback (adversarial pass 111). Now they
work like any name, and job.json, which holds text only, writes the odd bytes as \\xNN."""

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_jsonl

import runner
from runner import GenerationParams
from runner.errors import RunnerError
from runner.jobs import create_job
from runner.worker import run_job

ODD = os.fsdecode(b"\xff\xfe")  # two bytes that are no UTF-8: '\udcff\udcfe'
PROMPTS = ["Hello there", "The old man said", "Once upon a time"]


def _input(folder, suffix):
    """The three prompts as a prompt file of that type, named with bytes that are not UTF-8."""
    path = folder / f"prompts{ODD}{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    elif suffix == ".csv":
        path.write_text(
            "id,prompt\n" + "".join(f"r{i},{p}\n" for i, p in enumerate(PROMPTS)), encoding="utf-8"
        )
    else:
        with open(path, "wb") as f:
            pq.write_table(pa.table({"id": [f"r{i}" for i in range(3)], "prompt": PROMPTS}), f)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_a_prompt_file_and_a_job_home_named_in_bytes_that_are_not_utf8(
    suffix, tmp_path, tiny_gpt2, gpt2_engine
):
    home = tmp_path / f"home{ODD}"
    job = create_job(_input(tmp_path, suffix), tiny_gpt2, GenerationParams(max_new_tokens=3), home=home)
    assert run_job(job, gpt2_engine, echo=None).finished
    df = runner.load_results(job.id, home=home)
    assert df["id"].tolist() == ["r0", "r1", "r2"] and df["prompt"].tolist() == PROMPTS
    said = json.loads((job.dir / "job.json").read_text(encoding="utf-8"))["input"]["path"]
    assert said.endswith(f"prompts\\xff\\xfe{suffix}"), said


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_results_export_to_a_name_in_bytes_that_are_not_utf8(suffix, tmp_path, tiny_gpt2, gpt2_engine):
    job = create_job(_input(tmp_path, ".jsonl"), tiny_gpt2, GenerationParams(max_new_tokens=3),
                     job_dir=tmp_path / "job")  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    to = tmp_path / f"out{ODD}{suffix}"
    assert runner.export_results(job.dir, to).rows == 3
    with open(to, "rb") as f:
        if suffix == ".parquet":
            ids = pq.read_table(f).column("id").to_pylist()
        elif suffix == ".jsonl":
            ids = [json.loads(line)["id"] for line in f]
        else:
            ids = [line.split(b",")[0].decode("utf-8-sig") for line in f.read().splitlines()[1:]]
    assert ids == ["r0", "r1", "r2"]
    assert sorted(os.listdir(tmp_path)) == sorted(["job", f"prompts{ODD}.jsonl", f"out{ODD}{suffix}"])


def test_a_setting_that_job_json_cannot_hold_is_refused_before_a_row_is_read(tmp_path, tiny_gpt2):
    """A model folder whose name is not UTF-8, or a stop string given such bytes, cannot be stored in job.json
    (the worker needs the model's very path): refused, naming it, with nothing left in the home."""
    odd_model = tmp_path / f"model{ODD}"
    shutil.copytree(tiny_gpt2, odd_model)
    prompts, home = _input(tmp_path, ".jsonl"), tmp_path / "home"
    with pytest.raises(RunnerError, match=r"^model '.*/model\\xff\\xfe' is not UTF-8 text, and job.json"):
        create_job(prompts, str(odd_model), GenerationParams(max_new_tokens=3), home=home)
    with pytest.raises(RunnerError, match=r"^params\.stop\.0 'end\\xff' is not UTF-8 text"):
        create_job(prompts, tiny_gpt2, GenerationParams(max_new_tokens=3, stop=["end" + os.fsdecode(b"\xff")]),
                   home=home)  # fmt: skip
    assert not home.exists() or [p for p in home.iterdir() if not p.name.startswith(".")] == []
