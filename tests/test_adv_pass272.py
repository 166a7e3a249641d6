"""Adversarial pass 272: per-row settings and OpenAI Batch compatibility (openai_batch.py, params.py's row
settings, `runner run-batch`), against what the OpenAI API and vLLM do with the same request.

Found, and kept fixed below:
- `GenerationParams(do_sample=False, temperature=0.7)` (or top_p, top_k, min_p beside do_sample false) was taken
  without a word, and the job ran greedy, at no temperature, where the CLI refuses `--greedy --temperature 0.7`
  and a row giving do_sample false beside its own temperature is refused: the one setting silently did nothing.
  It is refused now, naming the setting, in the CLI's and the row's words; temperature 0 beside them stays greedy
  (as `--temperature 0 --top-p 0.9` records it). Settings read as recorded (job.json, a row's do_sample false
  over its job's temperature) are taken as before, so a job made so in Python before resumes.
- A plain row asking for 0 new tokens (`max_tokens: 0`, lm-eval's and the OpenAI API's way of asking a prompt's
  log-probs alone) was refused "max_tokens must be in [1, 1000000], got 0." and no more, where a Batch request
  with echo and max_tokens 0 is pointed at `runner score`. The refusal now ends with a note naming `runner score`
  and the command for the file (the row's own message, which errors.jsonl keeps as submit wrote it, unchanged).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import COMP, batch_request, invoke, write_jsonl

import runner
from runner import GenerationParams
from runner.errors import ParamError
from runner.jobdir import Job
from runner.jobs import create_job
from runner.params import _as_recorded, row_params


@pytest.mark.parametrize(
    ("given", "field"),
    [({"temperature": 0.7}, "temperature"), ({"top_p": 0.9}, "top_p"), ({"top_k": 5}, "top_k"),
     ({"min_p": 0.1}, "min_p"), ({"temperature": 1.5, "top_p": 0.5, "num_return_sequences": 2}, "temperature")],
)  # fmt: skip
def test_do_sample_false_beside_a_sampling_setting_is_refused_naming_it(given, field):
    with pytest.raises(ParamError, match=rf"^{field} has no effect with do_sample false, which takes the most "
                       rf"likely token: give one of do_sample and {field}\.$") as e:  # fmt: skip
        GenerationParams(do_sample=False, **given)
    assert e.value.param == field
    # set after construction, or copied: the same (the object left as it was)
    params = GenerationParams(do_sample=False)
    with pytest.raises(ParamError, match=f"^{field} has no effect"):
        setattr(params, field, given[field])
    assert params.do_sample is False and getattr(params, field) == getattr(GenerationParams(), field)
    with pytest.raises(ParamError, match=f"^{field} has no effect"):
        dataclasses.replace(GenerationParams(max_new_tokens=3), do_sample=False, **given)


@pytest.mark.parametrize(
    "given",
    [{"do_sample": False}, {"do_sample": False, "temperature": 0}, {"do_sample": False, "temperature": 0,
     "top_p": 0.9}, {"temperature": 0, "top_k": 5}, {"do_sample": False, "temperature": 1.0, "top_p": 1.0}],
)  # fmt: skip
def test_greedy_said_once_or_twice_is_taken(given):
    params = GenerationParams(**given)
    assert not params.sampled
    assert GenerationParams.from_dict(params.to_dict()).to_dict() == params.to_dict()


def test_a_rows_do_sample_false_in_a_job_at_a_temperature_is_greedy_as_before():
    job = GenerationParams(temperature=0.7, top_p=0.9)
    row = row_params(job, False, {"do_sample": False})
    assert row.do_sample is False and not row.sampled and row.temperature == 0.7
    with pytest.raises(ParamError, match="^temperature has no effect with do_sample false"):
        row_params(job, False, {"do_sample": False, "temperature": 0.5})


def test_a_job_made_before_with_do_sample_false_beside_a_temperature_resumes(tmp_path, tiny_gpt2):
    """job.json records what the job was made with: read back as recorded, not refused as a new request."""
    from runner.engine import Engine
    from runner.worker import run_job

    with _as_recorded():  # as GenerationParams took it before this pass
        old = GenerationParams(max_new_tokens=3, do_sample=False, temperature=0.7, seed=1)
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"prompt": "The old man", "max_tokens": 2}]
    )
    job = create_job(path, tiny_gpt2, old, job_dir=tmp_path / "old")
    assert job.meta["params"]["do_sample"] is False and job.meta["params"]["temperature"] == 0.7
    again = Job.open(job.dir)
    assert again.params.temperature == 0.7 and not again.params.sampled
    assert run_job(again, Engine(tiny_gpt2), echo=None).finished
    greedy = create_job(path, tiny_gpt2, GenerationParams(max_new_tokens=3, do_sample=False, seed=1),
                        job_dir=tmp_path / "greedy")  # fmt: skip
    assert run_job(greedy, Engine(tiny_gpt2), echo=None).finished
    cols = ["id", "text", "token_ids"]
    assert runner.load_results(job.dir)[cols].equals(runner.load_results(greedy.dir)[cols])
    assert json.loads(job.prompts().to_pylist()[1]["settings"]) == {"max_new_tokens": 2}


SCORE_NOTE = ("(a row asking for 0 new tokens asks for its prompt's log-probs alone: that is `runner score`'s work, "
              "not a generate job's, which generates at least one token: {} gives each text's logprob, and each "
              "token's in token_logprobs)")  # fmt: skip


@pytest.mark.parametrize("field", ["max_tokens", "max_new_tokens", "max_completion_tokens"])
def test_a_plain_row_asking_for_no_tokens_is_pointed_at_runner_score(tmp_path, tiny_gpt2, runner_home, field):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}, {"question": "The old man", field: 0.0}])
    out = invoke("submit", path, "-m", tiny_gpt2, "--prompt-field", "question")
    assert out.exit_code == 1
    how = "runner score INPUT -m MODEL --text-field question"
    assert out.stderr.splitlines()[-1] == SCORE_NOTE.format(how), out.stderr
    assert "p.jsonl:1: " in out.stderr  # (the other row's own problem, listed as ever)
    # under --skip-invalid its line in errors.jsonl is as submit wrote it before (runner repair compares them)
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hello"}, {"prompt": "The old man", field: 0}])
    job = create_job(path, tiny_gpt2, skip_invalid=True, job_dir=tmp_path / "job")
    line = json.loads((job.dir / "errors.jsonl").read_text())
    assert line["message"] == f"{field} must be in [1, 1000000], got 0." and line["field"] == field
    # from Python, in Python's words
    with pytest.raises(runner.InputError) as e:
        runner.submit([{"prompt": "Hello", field: 0}], tiny_gpt2, home=tmp_path / "home")
    how = "runner.submit(INPUT, MODEL, runner.ScoreParams(), prompt_field='prompt')"
    assert str(e.value).splitlines()[-1] == SCORE_NOTE.format(how), str(e.value)


def test_no_score_note_for_other_problems_nor_for_a_batch_request(tmp_path, tiny_gpt2, runner_home):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello", "max_tokens": -1}, {"prompt": "x", "n": 0}])
    assert "runner score" not in invoke("submit", path, "-m", tiny_gpt2).stderr
    lines = [batch_request("a", COMP, {"prompt": "Hi", "max_tokens": 0})]
    out = invoke(
        "submit", write_jsonl(tmp_path / "b.jsonl", lines), "-m", tiny_gpt2, "--served-model-name", "tiny"
    )
    assert "max_tokens must be in [1, 1000000], got 0." in out.stderr and "runner score" not in out.stderr
