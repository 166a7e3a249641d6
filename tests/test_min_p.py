"""min_p (transformers' MinPLogitsWarper, vLLM's and llama.cpp's min-p): the settings object, the CLI option, a
row's own setting (JSONL, CSV, Batch bodies), the per-row tensors of a decode batch and every decode path."""

import json

import pytest
import torch
from helpers import PROMPTS, assert_same_completions, ids_of, invoke, write_jsonl
from test_sampling import lm_like_scores
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import runner
from runner import GenerationParams, ParamError, jobdir
from runner.jobs import create_job
from runner.params import _as_recorded
from runner.sampling import RowSettings, process
from runner.worker import run_job


def transformers_warped(scores: torch.Tensor, p: GenerationParams) -> torch.Tensor:
    """What transformers' generate does to a sampled row's scores: its warpers in _get_logits_processor's order
    (temperature, top-k, top-p, then min-p), min_tokens_to_keep 1 (no beams)."""
    warpers = LogitsProcessorList()
    if p.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k, min_tokens_to_keep=1))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p, min_tokens_to_keep=1))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p, min_tokens_to_keep=1))
    return warpers(None, scores.clone())


MIXED = [
    dict(do_sample=True, min_p=0.05),
    dict(do_sample=True, min_p=0.2, top_p=0.9, top_k=50, temperature=0.6),
    dict(do_sample=True),  # sampled without min_p, beside rows with it
    dict(do_sample=True, min_p=0.1, top_k=200, temperature=1.3),
    dict(do_sample=True, min_p=0.02, top_p=0.95),
    dict(do_sample=False, min_p=0.5),  # greedy: no warper touches it
    dict(do_sample=True, min_p=1.0),  # only the most likely token(s)
    dict(do_sample=True, min_p=0.3, temperature=0.7),
]


@pytest.mark.parametrize("half", [False, True])
def test_each_rows_distribution_is_min_p_warpers_in_transformers_order(half, test_device):
    """Rows with different min_p (and temperature / top-k / top-p) in one batch: each row's processed scores
    are, bit for bit, what transformers' warpers give that row alone; greedy and min_p-less rows are untouched
    by it. `half`: bfloat16-rounded scores, where ties in probability are common."""
    scores = lm_like_scores(len(MIXED), seed=11, half=half).to(test_device)
    # (the greedy row's min_p: a row's do_sample false in a job at min_p, as row_params makes it)
    with _as_recorded():
        params = [GenerationParams(max_new_tokens=4, **m) for m in MIXED]
    s = RowSettings.of(params, test_device)
    assert s.min_p.dtype == s.temperature.dtype and s.min_p.device == s.temperature.device
    assert s.min_p.shape == (len(MIXED), 1)
    ours = process(scores, None, None, s)
    for i, p in enumerate(params):
        expected = transformers_warped(scores[i : i + 1], p) if p.sampled else scores[i : i + 1]
        assert torch.equal(torch.isinf(ours[i : i + 1]), torch.isinf(expected)), f"row {i}: {MIXED[i]}"
        # (on CUDA a row's own temperature divides a ulp apart from transformers' scalar: test_sampling)
        ulp = 3e-7 if scores.device.type != "cpu" and p.sampled and p.temperature != 1.0 else 0.0
        torch.testing.assert_close(ours[i : i + 1], expected, rtol=ulp, atol=0, msg=f"row {i}: {MIXED[i]}")
    # min_p really cut: each sampled row with it keeps fewer tokens than the same row without it
    without = process(
        scores, None, None, RowSettings.of([p.replaced(min_p=0.0) for p in params], test_device)
    )
    for i, p in enumerate(params):
        kept, kept_without = int(torch.isfinite(ours[i]).sum()), int(torch.isfinite(without[i]).sum())
        assert kept < kept_without if p.sampled and p.min_p else kept == kept_without, f"row {i}"


def test_min_p_is_checked_and_decides_sampling_as_top_p_does():
    for bad, message in ((1.5, r"min_p must be in \[0, 1\], got 1\.5\."), (-0.1, r"min_p must be in \[0, 1\]"),
                         ("low", r"min_p must be a number, got 'low'\."), (float("nan"), "must be a finite")):  # fmt: skip
        with pytest.raises(ParamError, match=message) as info:
            GenerationParams(min_p=bad)
        assert info.value.param == "min_p" and info.value.option == "--min-p"
    assert GenerationParams(min_p=0.05).do_sample is True  # asks for sampling, as top_p does
    assert GenerationParams(min_p=0).do_sample is False and GenerationParams(min_p=1).min_p == 1.0
    assert GenerationParams(min_p=0.05, temperature=0).do_sample is False  # temperature 0: greedy
    with pytest.raises(ParamError, match=r"num_beams=2 is beam search.*min_p"):
        GenerationParams(min_p=0.1, num_beams=2)
    # off is left out of the stored settings: a job made before min_p keeps its fingerprint
    assert "min_p" not in GenerationParams().to_dict()
    p = GenerationParams(min_p=0.1)
    assert p.to_dict()["min_p"] == 0.1 and GenerationParams.from_dict(p.to_dict()) == p


def test_a_rows_min_p_samples_and_is_refused_out_of_range():
    from runner.params import row_overrides, row_params

    greedy = GenerationParams(do_sample=False)
    assert row_params(greedy, False, row_overrides({"min_p": 0.1})).do_sample is True  # as a row's top_p
    assert row_params(GenerationParams(temperature=0), True, {"min_p": 0.1}).do_sample is False
    with pytest.raises(ParamError, match="min_p has no effect with do_sample false"):
        row_params(greedy, False, {"min_p": 0.1, "do_sample": False})


def test_the_cli_option_is_checked_naming_it(tmp_path, tiny_gpt2):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello"}])
    bad = invoke("submit", f, "-m", tiny_gpt2, "--min-p", "2")
    assert bad.exit_code == 1 and "Error: --min-p: min_p must be in [0, 1], got 2.0." in bad.output
    greedy = invoke("submit", f, "-m", tiny_gpt2, "--min-p", "0.1", "--greedy")
    assert greedy.exit_code == 1 and "--min-p" in greedy.output and "no effect with --greedy" in greedy.output


def test_a_rows_invalid_min_p_is_named_by_file_line_and_field(tmp_path, tiny_gpt2, runner_home):
    rows = [{"id": "a", "prompt": "Hi", "min_p": 0.1}, {"id": "b", "prompt": "Hi", "min_p": 2}]
    with pytest.raises(runner.InputError) as info:
        create_job(write_jsonl(tmp_path / "p.jsonl", rows), tiny_gpt2, home=runner_home)
    assert "p.jsonl:2: min_p: min_p must be in [0, 1], got 2.0." in str(info.value)
    csv = tmp_path / "p.csv"
    csv.write_text("id,prompt,min_p\na,Hi,0.1\nb,Hi,lots\n", encoding="utf-8")
    with pytest.raises(runner.InputError) as info:
        create_job(csv, tiny_gpt2, home=runner_home)
    assert "p.csv:3: min_p: min_p must be a number, got 'lots'." in str(info.value)


# --- every decode path, on the tiny random models -------------------------------------------------------------


def mixed_rows(n: int) -> list[GenerationParams]:
    """Sampled rows with and without min_p (and other settings), and a greedy one."""
    kinds = [
        dict(do_sample=True, min_p=0.3),
        dict(do_sample=True, temperature=1.2),
        dict(do_sample=True, min_p=0.1, top_k=40, temperature=0.8),
        dict(do_sample=False),
        dict(do_sample=True, min_p=0.5, top_p=0.95, repetition_penalty=1.2),
    ]
    return [GenerationParams(max_new_tokens=10, **kinds[i % len(kinds)]) for i in range(n)]


@pytest.mark.parametrize("engine_name", ["gpt2_engine", "llama_engine"])
def test_sampled_rows_with_min_p_batched_equal_each_alone(request, engine_name):
    """A static batch and a refilled one (2 slots, rows joining as others end) of rows with their own min_p
    (and none): each row's tokens are its own, seeded, whatever its batch; and min_p changed them."""
    engine = request.getfixturevalue(engine_name)
    prompts = ids_of(engine, PROMPTS)
    params = mixed_rows(len(prompts))
    seeds = [70 + i for i in range(len(prompts))]
    alone = [engine.generate([p], [q], [s])[0] for p, q, s in zip(prompts, params, seeds, strict=True)]
    assert_same_completions(engine.generate(prompts, params, seeds), alone)
    assert_same_completions(engine.generate(prompts, params, seeds, max_active=2), alone)
    plain = engine.generate(prompts, [p.replaced(min_p=0.0) for p in params], seeds)
    changed = [i for i, (a, b) in enumerate(zip(alone, plain, strict=True)) if a.token_ids != b.token_ids]
    assert changed and all(params[i].min_p for i in changed)


@pytest.mark.parametrize("max_active", [None, 3])
def test_the_samples_of_one_prompt_share_its_pass_with_min_p(gpt2_engine, max_active):
    """n samples of a prompt (one prompt pass between them), min_p on: each equals that sample alone."""
    distinct = ids_of(gpt2_engine, PROMPTS[:3])
    prompts = [p for p in distinct for _ in range(3)]
    params = GenerationParams(max_new_tokens=8, min_p=0.2, temperature=1.5)
    seeds = [500 + i for i in range(len(prompts))]
    shared = gpt2_engine.generate(prompts, params, seeds, max_active=max_active)
    assert_same_completions(
        shared, [gpt2_engine.generate([p], params, [s])[0] for p, s in zip(prompts, seeds, strict=True)]
    )
    assert len({tuple(c.token_ids) for c in shared}) > len(distinct)  # the samples really differ


def test_a_constrained_row_cuts_min_p_within_what_its_constraint_allows(gpt2_engine):
    """The constraint's mask applies first (as vLLM's): min_p is relative to the likeliest allowed token. A
    constrained sampled row with min_p beside unconstrained ones equals itself alone and obeys; min_p 1 keeps
    only the likeliest allowed token, so it decodes as the constrained greedy row does."""
    import re

    prompts = ids_of(gpt2_engine, ["The date is", "Hello", "My friend"])
    date = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    params = [GenerationParams(max_new_tokens=12, regex=date, min_p=0.3, temperature=1.5), *mixed_rows(2)]
    seeds = [1, 2, 3]
    batched = gpt2_engine.generate(prompts, params, seeds)
    assert_same_completions(
        batched,
        [gpt2_engine.generate([p], [q], [s])[0] for p, q, s in zip(prompts, params, seeds, strict=True)],
    )
    assert re.fullmatch(date, batched[0].text)
    top = gpt2_engine.generate(prompts[:1], params[0].replaced(min_p=1.0), [9])[0]
    greedy = gpt2_engine.generate(prompts[:1], GenerationParams(max_new_tokens=12, regex=date))[0]
    assert top.token_ids == greedy.token_ids


def test_min_p_one_is_greedy(gpt2_engine):
    """min_p 1 keeps only the most likely token: sampling then gives the greedy answer (as top_k 1 does)."""
    prompts = ids_of(gpt2_engine, PROMPTS)
    greedy = gpt2_engine.generate(prompts, GenerationParams(max_new_tokens=8))
    sampled = gpt2_engine.generate(prompts, GenerationParams(max_new_tokens=8, min_p=1.0, temperature=2.0),
                                   list(range(len(prompts))))  # fmt: skip
    assert [c.token_ids for c in sampled] == [c.token_ids for c in greedy]


def test_a_no_repeat_ngram_row_passes_min_p_to_transformers_generate(gpt2_engine):
    """Rows through transformers' generate (no_repeat_ngram_size) sample with its own min_p: the same tokens as
    model.generate(min_p=...) seeded alike."""
    from transformers import GenerationConfig

    prompt = gpt2_engine.tokenizer("The old man")["input_ids"]
    params = GenerationParams(max_new_tokens=10, no_repeat_ngram_size=2, min_p=0.4, temperature=1.5, seed=3)
    got = gpt2_engine.transformers_generate(prompt, params, 3)[0]
    ids = torch.tensor([prompt], device=gpt2_engine.device)

    def theirs(min_p):
        config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, min_p=min_p,
                                  no_repeat_ngram_size=2, pad_token_id=gpt2_engine.pad_id,
                                  eos_token_id=gpt2_engine.eos_ids)  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            out = gpt2_engine.model.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
        return out[0, len(prompt) :].tolist()

    want = theirs(0.4)
    assert want[: len(got.token_ids)] == got.token_ids and want != theirs(None)


# --- jobs: a row's own min_p, Batch bodies, the stored settings ----------------------------------------------


def test_a_rows_own_min_p_overrides_the_jobs(tmp_path, tiny_gpt2, gpt2_engine):
    """In a sampling job (temperature 2), the row giving min_p 1 gets the greedy answer, the row beside it with
    the same prompt (a null min_p in a DataFrame: the job's) samples; the row's setting is in its results; and
    the job's layout version keeps a runner from before min_p off it."""
    import pandas as pd

    df = pd.DataFrame({"id": ["top", "free"], "prompt": [PROMPTS[0]] * 2, "min_p": [1.0, None]})
    job = create_job(df, tiny_gpt2, GenerationParams(max_new_tokens=10, temperature=2.0, seed=5),
                     job_dir=tmp_path / "job")  # fmt: skip
    assert job.meta["format"] == jobdir.MIN_P_FORMAT and "min_p" not in job.meta["params"]
    assert run_job(job, gpt2_engine, echo=None).finished
    got = runner.load_results(job.dir).set_index("id")
    greedy = gpt2_engine.generate(ids_of(gpt2_engine, PROMPTS[:1]), GenerationParams(max_new_tokens=10))[0]
    assert list(got.loc["top", "token_ids"]) == greedy.token_ids
    assert list(got.loc["free", "token_ids"]) != greedy.token_ids
    assert json.loads(got.loc["top", "settings"]) == {"min_p": 1.0}
    plain = create_job(df[["id", "prompt"]], tiny_gpt2, job_dir=tmp_path / "plain")
    # a job without min_p has the layout of its model fingerprint (version 7), which a runner that computes it
    # otherwise does not read (pass 250)
    assert plain.meta["format"] == jobdir.FINGERPRINT_FORMAT
    assert create_job(df[["id", "prompt"]], tiny_gpt2, GenerationParams(min_p=0.1),
                      job_dir=tmp_path / "jobs_own").meta["format"] == jobdir.MIN_P_FORMAT  # fmt: skip


def test_a_batch_requests_min_p_is_taken_as_vllm_takes_it(tmp_path, tiny_gpt2, gpt2_engine):
    """vLLM's extra sampling parameter min_p (OpenAI's API has none), as top_k: a request's own; out of range, it
    is refused naming the line and the body's field."""
    url = "/v1/completions"

    def line(cid, **body):
        return {"custom_id": cid, "method": "POST", "url": url,
                "body": {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 8, **body}}  # fmt: skip

    lines = [line("top", min_p=1.0, temperature=2.0), line("greedy", temperature=0)]
    job = create_job(write_jsonl(tmp_path / "b.jsonl", lines), tiny_gpt2, served_model_names=("tiny",),
                     job_dir=tmp_path / "job")  # fmt: skip
    assert run_job(job, gpt2_engine, echo=None).finished
    got = runner.load_results(job.dir).set_index("id")
    assert list(got.loc["top", "token_ids"]) == list(got.loc["greedy", "token_ids"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [lines[1], line("x", min_p=1.5)])
    with pytest.raises(runner.InputError) as err:
        create_job(bad, tiny_gpt2, served_model_names=("tiny",), home=tmp_path / "home")
    assert "bad.jsonl:2: min_p: min_p must be in [0, 1], got 1.5." in str(err.value)


def test_a_resume_with_another_min_p_is_refused_naming_it(tmp_path, tiny_gpt2):
    """The job's settings record min_p, so `run -o` again with another (or none) is refused as other settings
    are, saying what differs; the same one resumes the job."""
    f = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "Hello"}])
    args = ("run", f, "-m", tiny_gpt2, "--max-new-tokens", "2", "-o", tmp_path / "job")
    assert invoke(*args, "--min-p", "0.1").exit_code == 0
    assert runner.Job.open(tmp_path / "job").params.min_p == 0.1
    assert invoke(*args, "--min-p", "0.1").exit_code == 0  # the same job
    other = invoke(*args, "--min-p", "0.2")
    assert other.exit_code == 1 and "other inputs or settings (min_p 0.1, now 0.2)" in other.output
    none = invoke(*args)
    assert none.exit_code == 1 and "(do_sample True, now False; min_p 0.1, now 0.0)" in none.output
    assert invoke(*args[:-1], tmp_path / "plain").exit_code == 0
    given = invoke(*args[:-1], tmp_path / "plain", "--min-p", "0.05")
    assert given.exit_code == 1 and "min_p 0.0, now 0.05" in given.output
