"""Beam search and no_repeat_ngram_size through transformers' own generate (engine.transformers_generate), as
the seed tutorials compare them with greedy and sampling: the same tokens and beam scores as transformers, raw
log-probs as our own loop reports them, results that do not depend on the batch."""

import pytest
import torch
from helpers import PROMPTS, invoke, write_jsonl

import runner
from runner import EngineOptions, GenerationParams, ParamError

BEAMS = GenerationParams(
    max_new_tokens=8, num_beams=4, num_return_sequences=2, length_penalty=0.8, no_repeat_ngram_size=2, seed=7
)


def test_beams_are_transformers_beams_with_raw_logprobs(gpt2_engine):
    prompt = gpt2_engine.tokenizer("The old man")["input_ids"]
    got = gpt2_engine.transformers_generate(prompt, BEAMS, None)
    ids = torch.tensor([prompt], device=gpt2_engine.device)
    want = gpt2_engine.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, num_beams=4, num_return_sequences=2,
        length_penalty=0.8, no_repeat_ngram_size=2, do_sample=False, pad_token_id=gpt2_engine.pad_id,
        eos_token_id=gpt2_engine.eos_ids, return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    assert len(got) == 2
    for c, seq, score in zip(got, want.sequences, want.sequences_scores, strict=True):
        new = seq[len(prompt) :].tolist()
        assert new[: len(c.token_ids)] == c.token_ids and c.beam_score == pytest.approx(
            float(score), abs=1e-5
        )
        full = torch.tensor([prompt + c.token_ids], device=gpt2_engine.device)
        lps = torch.log_softmax(gpt2_engine.model(full).logits[0, len(prompt) - 1 : -1].float(), -1)
        assert c.token_logprobs == pytest.approx(
            lps.gather(1, full[0, len(prompt) :, None])[:, 0].tolist(), abs=1e-5
        )
    assert got[0].beam_score >= got[1].beam_score  # the best beam first


def test_beam_and_ngram_jobs_do_not_depend_on_the_batch(tmp_path, tiny_gpt2, gpt2_engine):
    rows = [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)]
    rows[1]["num_beams"] = 1  # a greedy row in the same job: our own loop, no beam score
    rows[2].update(num_beams=1, no_repeat_ngram_size=2, temperature=0.9)  # sampled, with its own seed
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    runs = []
    for bs in (1, 8):
        job, summary = runner.run(f, tiny_gpt2, BEAMS, EngineOptions(batch_size=bs), output=tmp_path / f"bs{bs}",
                                  engine=gpt2_engine, echo=None)  # fmt: skip
        assert summary.finished
        runs.append(runner.load_results(job.dir))
    a, b = runs
    cols = ["id", "sample", "text", "token_ids", "finish_reason", "beam_score"]
    for col in cols:
        assert a[col].to_json() == b[col].to_json(), (col, a[col].tolist(), b[col].tolist())
    assert len(a) == 2 * len(PROMPTS)  # -n 2: the two best beams, or two samples
    by_id = a.set_index(["id", "sample"])
    assert by_id.loc[("1", 0), "beam_score"] != by_id.loc[("1", 0), "beam_score"]  # NaN: not a beam row
    assert by_id.loc[("0", 0), "beam_score"] >= by_id.loc[("0", 1), "beam_score"]
    prompt_ids = gpt2_engine.tokenizer(PROMPTS[2])["input_ids"]
    for s in (0, 1):  # no generated token completes a bigram seen before (in the prompt or the generation)
        seq = prompt_ids + [int(t) for t in by_id.loc[("2", s), "token_ids"]]
        for j in range(len(prompt_ids), len(seq)):
            assert (seq[j - 1], seq[j]) not in set(zip(seq[: j - 1], seq[1:j], strict=True))
    beams = gpt2_engine.transformers_generate(
        prompt_ids if False else gpt2_engine.tokenizer(PROMPTS[0])["input_ids"], BEAMS, None
    )
    assert [list(by_id.loc[("0", s), "token_ids"]) for s in (0, 1)] == [c.token_ids for c in beams]


@pytest.mark.parametrize(
    ("settings", "param", "message"),
    [
        ({"num_beams": 4, "temperature": 0.8}, "num_beams", "beam search, which does not sample"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences", "must be <= num_beams=2"),
        ({"num_beams": 2, "presence_penalty": 0.5}, "presence_penalty", "not available with num_beams"),
        ({"num_beams": 2, "logprobs": 2}, "num_beams", "not available with num_beams"),
        ({"no_repeat_ngram_size": 2, "logprobs": 2}, "no_repeat_ngram_size", "not available with no_repeat"),
        ({"num_beams": 2, "length_penalty": 1000.0}, "length_penalty", "must be in \\[-10, 10\\]"),
        ({"num_beams": 0}, "num_beams", "num_beams"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size", "no_repeat_ngram_size"),
    ],
)
def test_beam_settings_are_checked(settings, param, message):
    with pytest.raises(ParamError, match=message) as e:
        GenerationParams(**settings)
    assert e.value.param == param


def test_generate_command_with_beams(tiny_gpt2, gpt2_engine):
    result = invoke("generate", "The old man", "-m", tiny_gpt2, "--max-new-tokens", 8, "--num-beams", 4, "-n", 2,
                    "--length-penalty", 0.8, "--no-repeat-ngram-size", 2)  # fmt: skip
    assert result.exit_code == 0, result.output
    beams = gpt2_engine.transformers_generate(gpt2_engine.tokenizer("The old man")["input_ids"], BEAMS, None)
    assert result.output.splitlines() == [f"[The old man] #{s} {c.text}" for s, c in enumerate(beams)]


def test_our_loop_refuses_rows_it_does_not_host(gpt2_engine):
    prompt = gpt2_engine.tokenizer("The old man")["input_ids"]
    with pytest.raises(ValueError, match="go through transformers_generate"):
        gpt2_engine.generate([prompt], GenerationParams(max_new_tokens=2, num_beams=2))
