"""Adversarial: OpenAI Batch export of log-probs (openai_batch.py) with token texts in place."""

import json

from helpers import write_jsonl

import runner
from runner import GenerationParams
from runner.params import ScoreParams
from runner.jobs import create_job
from runner.openai_batch import export
from runner.worker import run_job


def _echo_job(tmp_path, model, engine):
    req = {"custom_id": "p", "method": "POST", "url": "/v1/completions",
           "body": {"model": "tiny", "prompt": "The old man", "max_tokens": 3, "temperature": 0,
                    "logprobs": 1, "echo": True}}  # fmt: skip
    path = write_jsonl(tmp_path / "requests.jsonl", [req])
    job = create_job(path, model, GenerationParams(max_new_tokens=3), runner.EngineOptions(),
                     job_dir=tmp_path / "job", served_model_names=("tiny",))  # fmt: skip
    assert run_job(job, engine, echo=None).finished
    export(job, tmp_path / "out.jsonl")
    (choice,) = json.loads((tmp_path / "out.jsonl").read_text())["response"]["body"]["choices"]
    return choice


def test_echo_text_offsets_point_at_their_tokens_when_the_prompt_starts_with_bos(tmp_path, tiny_llama,
                                                                                  llama_engine):  # fmt: skip
    """The tiny Llama adds <s>: its piece "<s>" (special tokens show as themselves) is left out of `tokens`
    (no log-prob) but still counted in every prompt token's `text_offset`, which are then 3 characters late
    (the echoed text has no "<s>"). The first scored prompt token "The" gets offset 3 instead of 0."""
    choice = _echo_job(tmp_path, tiny_llama, llama_engine)
    text, lp = choice["text"], choice["logprobs"]
    assert text.startswith("The old man")
    prompt_part = [(t, o) for t, o in zip(lp["tokens"], lp["text_offset"], strict=True) if o < len("The old man")]
    assert prompt_part, lp
    for tok, off in prompt_part:
        assert text[off : off + len(tok)] == tok, (tok, off, lp["tokens"], lp["text_offset"])


def test_results_format_openai_of_a_score_job_is_refused_clearly(tmp_path, tiny_gpt2, gpt2_engine):
    """A score job has no OpenAI Batch form; `runner results JOB --format openai --to out.jsonl` treats its
    rows as embeddings (the default url for a non-generate job) and dies with KeyError: 'embedding'."""
    from click.testing import CliRunner

    from runner.cli import cli

    path = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "text": "吾輩は猫である"}])
    job, summary = runner.run(path, tiny_gpt2, ScoreParams(), output=tmp_path / "job",
                              engine=gpt2_engine, echo=None)  # fmt: skip
    assert summary.finished
    result = CliRunner().invoke(cli, ["results", str(job.dir), "--format", "openai", "--to", str(tmp_path / "o.jsonl")])
    assert not isinstance(result.exception, KeyError), repr(result.exception)
    assert result.exit_code != 0 and "score" in result.output, result.output
