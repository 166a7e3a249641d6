"""Adversarial pass 272: per-row settings and OpenAI Batch compatibility (openai_batch.py, params.py's row
settings, `runner run-batch`), against what the OpenAI API and vLLM do with the same request.

Found, and kept fixed below:
- `GenerationParams(do_sample=False, temperature=0.7)` (or top_p, top_k, min_p beside do_sample false) was taken
  without a word, and the job ran greedy, at no temperature, where the CLI refuses `--greedy --temperature 0.7`
  and a row giving do_sample false beside its own temperature is refused: the one setting silently did nothing.
  It is refused now, naming the setting, in the CLI's and the row's words; temperature 0 beside them stays greedy
  (as `--temperature 0 --top-p 0.9` records it). Settings read as recorded (job.json, a row's do_sample false
  over its job's temperature) are taken as before, so a job made so in Python before resumes. Given loose to
  `runner.generate(..., do_sample=False, temperature=0.7)`, the TypeError showing them inside GenerationParams says
  that object refuses them (it showed a call that raised next; `top_p=5` alike).
- A plain row asking for 0 new tokens (`max_tokens: 0`, lm-eval's and the OpenAI API's way of asking a prompt's
  log-probs alone) was refused "max_tokens must be in [1, 1000000], got 0." and no more, where a Batch request
  with echo and max_tokens 0 is pointed at `runner score`. The refusal now ends with a note naming `runner score`
  and the command for the file (the row's own message, which errors.jsonl keeps as submit wrote it, unchanged).

Checked, and kept (no defect): a batch mixing greedy and sampled requests, stop strings, min_tokens, penalties,
top_k / top_p / min_p, both log-prob spellings, echo, a JSON constraint and max_tokens 1..12 gives every sample
what its row gets alone, with continuous batching and without (the same output bytes); every output and error
line validates as an openai 3.63 object; non-object JSON lines, duplicate custom_ids, another model, logit_bias,
echo with max_tokens 0 and broken JSON become 400 lines of the error file under --skip-invalid, in input order.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import CHAT, COMP, batch_request, invoke, write_jsonl

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

    # a setting given loose to runner.generate is shown inside the object, which says it refuses them
    with pytest.raises(TypeError) as e:
        runner.generate(["Hi"], "unused", do_sample=False, **given)
    said = str(e.value)
    assert said.startswith("generate() takes do_sample in its settings, not as a keyword of its own: ")
    assert said.endswith(f", where they are refused: {field} has no effect with do_sample false, which takes the "
                         f"most likely token: give one of do_sample and {field}."), said  # fmt: skip


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


def _mixed_requests():
    """Requests whose own settings differ in every way a batch can mix them: greedy beside sampled rows, stop
    strings, min_tokens, penalties on greedy rows, top_k / top_p / min_p, log-probs of both spellings, echo, a
    JSON constraint and max_tokens from 1 to 12."""
    chat = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    return [
        batch_request("g1", COMP, {"prompt": "The old man", "max_tokens": 12, "temperature": 0, "stop": ["e", "a"]}),
        batch_request("g2", COMP, {"prompt": "Every student", "max_tokens": 9, "temperature": 0,
                                   "presence_penalty": 1.5, "frequency_penalty": -1}),
        batch_request("s1", COMP, {"prompt": "A language model", "max_tokens": 7, "n": 3, "seed": 5, "top_k": 4}),
        batch_request("s2", CHAT, {"messages": chat("Tell me"), "max_tokens": 10, "min_tokens": 6,
                                   "temperature": 0.8, "stop": "\n"}),
        batch_request("s3", COMP, {"prompt": "The old man", "max_tokens": 11, "min_p": 0.2,
                                   "repetition_penalty": 1.4, "logprobs": 5}),
        batch_request("g3", CHAT, {"messages": chat("Hello there"), "max_completion_tokens": 5, "temperature": 0,
                                   "logprobs": True, "top_logprobs": 3}),
        batch_request("e1", COMP, {"prompt": "Every student", "max_tokens": 3, "echo": True, "logprobs": 1,
                                   "temperature": 0}),
        batch_request("j1", CHAT, {"messages": chat("Give JSON"), "max_tokens": 12, "seed": 9,
                                   "response_format": {"type": "json_object"}}),
        batch_request("t1", COMP, {"prompt": "The old man", "max_tokens": 8, "top_p": 0.5, "seed": 3}),
        batch_request("z1", COMP, {"prompt": "The", "max_tokens": 1, "temperature": 0}),
    ]  # fmt: skip


def test_a_batch_mixing_every_kind_of_row_setting_gives_each_row_what_it_gets_alone(tmp_path, tiny_llama):
    """Checked, and kept: with continuous batching and without, each sample equals its row generated alone
    with its own settings and seed, and both runs export the same bytes, every line an openai object."""
    from test_openai_batch import check_output_line

    from runner.engine import Engine
    from runner.openai_batch import export
    from runner.tasks import _row_params, sample_seed
    from runner.worker import run_job

    path = write_jsonl(tmp_path / "r.jsonl", _mixed_requests())
    engine = Engine(tiny_llama)
    outs = []
    for continuous in (True, False):
        job = create_job(path, tiny_llama, GenerationParams(max_new_tokens=16, seed=7),
                         runner.EngineOptions(batch_size=64, continuous_batching=continuous),
                         job_dir=tmp_path / f"job{continuous}", served_model_names=("tiny",))  # fmt: skip
        assert run_job(job, engine, echo=None).finished
        df = runner.load_results(job.dir)
        assert len(df) == 12
        prompts = job.prompts()
        per_row = _row_params(job, prompts)
        ids, input_ids = prompts.column("id").to_pylist(), prompts.column("input_ids").to_pylist()
        for _, r in df.iterrows():
            i = ids.index(r["id"])
            p = per_row(i)
            seed = sample_seed(job.seed if p.seed is None else p.seed, r["id"], int(r["sample"]))
            alone = engine.generate([input_ids[i]], [p], [seed])[0]
            assert list(r["token_ids"]) == alone.token_ids, (continuous, r["id"], r["sample"])
            assert r["text"] == alone.text and r["finish_reason"] == alone.finish_reason
        out = tmp_path / f"out{continuous}.jsonl"
        assert export(job, out) == (10, 0)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    parsed = {x["custom_id"]: check_output_line(x) for x in map(json.loads, outs[0].decode().splitlines())}
    # usage: the prompt once, every sample's tokens (n = 3), as the API counts them
    s1 = df[df["id"] == "s1"]
    assert len(parsed["s1"].choices) == 3 and parsed["s1"].usage.prompt_tokens == int(
        s1["prompt_tokens"].iloc[0]
    )
    assert parsed["s1"].usage.completion_tokens == int(s1["completion_tokens"].sum())
