"""Adversarial pass on hub pins (c9fcc78): a hub model's job pinned at submit to a snapshot, with an offline
cache that lacks parts of it, moves under it, or holds another tokenizer."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_jsonl
from test_adv_model_changes import HUB_ID, ROWS, SNAPSHOTS, _answers, _hub_cache
from workers import run_worker

import runner
from runner import GenerationParams
from runner.cli import cli
from runner.jobdir import PROMPTS, BrokenJob, Job, read_state
from runner.jobs import create_job
from runner.params import EmbedParams, ScoreParams
from runner.scheduler import work


@pytest.mark.parametrize("lacking", [("model.safetensors",), ("tokenizer.json", "tokenizer_config.json")])
def test_a_pinned_snapshot_without_its_weights_or_tokenizer_here_waits_not_fails(
    tmp_path, tiny_gpt2, runner_home, monkeypatch, lacking
):
    """The cache holds the pinned snapshot's config.json but not its weights, or not its tokenizer (an
    interrupted download, a cache AutoConfig alone filled): offline, the job waits for a machine that has them,
    as it does when the whole snapshot is missing, and status says why; it was failed for every worker of the
    home ("cannot load model ... pass --allow-pickle-weights")."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    snapshot = main.parent.parent / "snapshots" / min(SNAPSHOTS)
    (tmp_path / "away").mkdir()
    for name in lacking:
        shutil.move(snapshot / name, tmp_path / "away" / name)
    lines: list[str] = []
    assert work(runner_home, echo=lines.append) == []
    assert read_state(job.dir).state == "queued", lines
    download = f"hf download {HUB_ID} --revision {min(SNAPSHOTS)}"
    assert any(download in line for line in lines), lines
    status = runner.status(job.dir)
    assert status.state == "queued" and download in status.message, status
    for name in lacking:
        shutil.move(tmp_path / "away" / name, snapshot / name)
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"


def _other_tokenizer(main) -> None:
    """Snapshot "b" of HUB_ID with a tokenizer of its own: the ids of its tokens (all but id 0, EOS) reversed,
    so a prompt tokenizes apart and a token id reads as another text."""
    path = main.parent.parent / "snapshots" / max(SNAPSHOTS) / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    top = max(vocab.values())
    tok["model"]["vocab"] = {t: i if i == 0 else top + 1 - i for t, i in vocab.items()}
    path.write_text(json.dumps(tok))


def test_repair_writes_lost_prompts_again_with_the_pinned_snapshots_tokenizer(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """prompts.parquet lost after refs/main moved to a snapshot whose tokenizer differs: `runner repair` writes
    it again with the pinned snapshot's tokenizer (the one submit used), byte for byte, and the job completes
    with the answers of its own snapshot."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    _other_tokenizer(main)
    params = GenerationParams(max_new_tokens=2)
    expected, _ = runner.run(write_jsonl(tmp_path / "ref.jsonl", ROWS), HUB_ID, params, echo=None)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, params)
    before = (job.dir / PROMPTS).read_bytes()
    main.write_text(max(SNAPSHOTS))
    (job.dir / PROMPTS).unlink()
    runner.repair(job.dir)
    assert (job.dir / PROMPTS).read_bytes() == before
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"
    assert _answers(job.dir) == _answers(expected.dir)


def test_an_openai_export_after_refs_main_moved_reads_tokens_with_the_pinned_tokenizer(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """A Batch job's export (its log-probs' token texts) made once refs/main names a snapshot whose tokenizer
    reads ids apart is the export made before: the job's own snapshot's tokenizer reads them."""
    from runner.openai_batch import export

    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    _other_tokenizer(main)
    body = {"model": "tiny", "prompt": "The old man", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    lines = [
        {"custom_id": f"p{i}", "method": "POST", "url": "/v1/completions", "body": body} for i in range(3)
    ]
    job = create_job(write_jsonl(tmp_path / "b.jsonl", lines), HUB_ID, GenerationParams(max_new_tokens=4),
                     served_model_names=("tiny",))  # fmt: skip
    assert work(runner_home, echo=None)[0].finished
    export(Job.open(job.dir), tmp_path / "before.jsonl")
    main.write_text(max(SNAPSHOTS))
    export(Job.open(job.dir), tmp_path / "after.jsonl")
    assert (tmp_path / "after.jsonl").read_bytes() == (tmp_path / "before.jsonl").read_bytes()


@pytest.mark.parametrize("params", [ScoreParams(), EmbedParams()], ids=["score", "embed"])
def test_score_and_embed_jobs_of_a_hub_model_run_on_their_pinned_snapshot(
    tmp_path, tiny_gpt2, runner_home, monkeypatch, params
):
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    rows = [{"id": r["id"], "text": r["prompt"]} for r in ROWS]
    expected, _ = runner.run(write_jsonl(tmp_path / "ref.jsonl", rows), HUB_ID, params, echo=None)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", rows), HUB_ID, params)
    assert job.spec.revision == min(SNAPSHOTS)
    main.write_text(max(SNAPSHOTS))
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"
    column = "embedding" if isinstance(params, EmbedParams) else "logprob"
    got, want = ([np.asarray(v).tolist() for v in runner.load_results(d).sort_values("id")[column]]
                 for d in (job.dir, expected.dir))  # fmt: skip
    assert got == want


def test_refs_main_moving_during_submit_pins_the_snapshot_its_prompts_were_tokenized_with(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """refs/main moves to a snapshot of another tokenizer just after submit read the commit (an `hf download` of
    an update landing then): the prompts are those of the pinned snapshot's tokenizer, as its workers read them."""
    from runner import jobs

    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    _other_tokenizer(main)
    params = GenerationParams(max_new_tokens=2)
    steady = create_job(write_jsonl(tmp_path / "ref.jsonl", ROWS), HUB_ID, params)
    real = jobs.hub_snapshot

    def moved_after(*args, **kwargs):
        commit = real(*args, **kwargs)
        main.write_text(max(SNAPSHOTS))
        return commit

    monkeypatch.setattr(jobs, "hub_snapshot", moved_after)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, params)
    assert job.spec.revision == min(SNAPSHOTS) and main.read_text() == max(SNAPSHOTS)
    assert (job.dir / PROMPTS).read_bytes() == (steady.dir / PROMPTS).read_bytes()
    assert job.meta["model_fingerprint"] == steady.meta["model_fingerprint"]


def test_a_byte_flipped_in_model_revision_breaks_the_job_and_repair_brings_the_pin_back(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """job.json's model_revision with one byte changed (still 40 hex digits: another commit) is not obeyed: the
    checksum breaks the job, `runner repair` restores job.json from job.backup.json, pin included, and the job
    runs on its snapshot."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    text = (job.dir / "job.json").read_text()
    assert text.count(min(SNAPSHOTS)) == 1
    (job.dir / "job.json").write_text(text.replace(min(SNAPSHOTS), max(SNAPSHOTS)))
    with pytest.raises(BrokenJob):
        Job.open(job.dir)
    assert runner.status(job.dir).state == "broken"
    runner.repair(job.dir)
    assert Job.open(job.dir).spec.revision == min(SNAPSHOTS)
    main.write_text(max(SNAPSHOTS))
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"


# (the demo reads its GGUF: ~28 s where the converted model is not cached, so not in the edit loop)
@pytest.mark.parametrize("given", ["folder", "relative", pytest.param("demo", marks=pytest.mark.slow)])
def test_a_local_folder_or_the_demo_is_never_pinned_nor_looked_up_on_the_hub(
    tmp_path, tiny_gpt2, runner_home, monkeypatch, given
):
    """A folder named like a hub id (`acme/tiny` under the current directory), an absolute folder and the demo
    alias: no model_revision, and the hub's snapshot is never asked for (its cache here holds acme/tiny too)."""
    from runner import jobs

    _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_gpt2, tmp_path / HUB_ID)
    model = {"folder": str(tmp_path / HUB_ID), "relative": HUB_ID, "demo": "SmolLM2-135M-Instruct"}[given]
    monkeypatch.setattr(jobs, "hub_snapshot", lambda *a, **k: pytest.fail("the hub was asked"))
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), model, GenerationParams(max_new_tokens=2))
    assert job.spec.revision is None and "model_revision" not in job.meta
    assert job.spec.model == (model if given == "demo" else str(tmp_path / HUB_ID))


@pytest.mark.slow
def test_workers_of_one_home_one_without_the_snapshot_finish_the_job_once(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """A worker with the snapshot is killed part done; a worker of the same home whose offline cache lacks it
    leaves the job queued, saying which commit to download, and computes nothing; the next worker with it
    finishes the job: each row once, every one of the pinned snapshot, though refs/main moved meanwhile."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    expected = _answers(runner.run(write_jsonl(tmp_path / "ref.jsonl", ROWS), HUB_ID,
                                   GenerationParams(max_new_tokens=2), echo=None)[0].dir)  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    job = create_job(path, HUB_ID, GenerationParams(max_new_tokens=2), runner.EngineOptions(batch_size=2),
                     name="pinned")  # fmt: skip
    code, out = run_worker(runner_home, env_extra={"RUNNER_FAULT": "after_shard:2"})
    assert code == -9, out
    with pytest.warns(UserWarning, match="queued"):
        done = len(runner.load_results(job.dir))
    assert 0 < done < len(ROWS)
    main.write_text(max(SNAPSHOTS))
    (tmp_path / "bare").mkdir()
    code, out = run_worker(runner_home, env_extra={"HF_HUB_CACHE": str(tmp_path / "bare")})
    # (exit 1: nothing could run here; the command stands apart from the words after it, to be copied)
    assert code == 1 and f"hf download {HUB_ID} --revision {min(SNAPSHOTS)}; " in out, out
    assert read_state(job.dir).state == "queued"
    with pytest.warns(UserWarning, match="queued"):
        assert len(runner.load_results(job.dir)) == done
    code, out = run_worker(runner_home)
    assert code == 0 and read_state(job.dir).state == "completed", out
    results = runner.load_results(job.dir)
    assert sorted(results["id"]) == sorted(r["id"] for r in ROWS) and _answers(job.dir) == expected


def test_a_snapshot_whose_tokenizer_is_vocab_and_merges_alone_is_not_waited_on(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """A repository whose tokenizer is vocab.json and merges.txt (no tokenizer_config.json, no tokenizer.json),
    downloaded whole offline: its snapshot lacks nothing, and the job runs, not left waiting for a download."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    snapshot = main.parent.parent / "snapshots" / min(SNAPSHOTS)
    model = json.loads((snapshot / "tokenizer.json").read_text())["model"]
    (snapshot / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (snapshot / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snapshot / name).unlink()
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    assert runner.status(job.dir).message is None
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"


def test_a_cache_filled_by_the_hinted_download_alone_runs_the_job(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """`hf download ORG/NAME --revision COMMIT` (the hint's command) fills a cache with that snapshot and no
    refs/main: offline, the pinned job runs from it, nothing asking for the newest."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    expected = _answers(runner.run(write_jsonl(tmp_path / "ref.jsonl", ROWS), HUB_ID,
                                   GenerationParams(max_new_tokens=2), echo=None)[0].dir)  # fmt: skip
    job = create_job(write_jsonl(tmp_path / "p.jsonl", ROWS), HUB_ID, GenerationParams(max_new_tokens=2))
    shutil.rmtree(main.parent)
    shutil.rmtree(main.parent.parent / "snapshots" / max(SNAPSHOTS))
    assert runner.status(job.dir).message is None
    assert work(runner_home, echo=None)[0].finished and read_state(job.dir).state == "completed"
    assert _answers(job.dir) == expected


@pytest.mark.parametrize("cache", ["hinted download", "update half downloaded"])
def test_runner_run_again_offline_carries_its_job_on_where_the_newest_is_not_here(
    tmp_path, tiny_gpt2, runner_home, monkeypatch, cache
):
    """Offline, the hub's newest is not here whole: a new machine's cache that the hint's `hf download ORG/NAME
    --revision COMMIT` filled (no refs/main), or an update whose download stopped after refs/main moved (its
    weights not there). `runner run FILE` again carries the job on, as `runner work` does, where it took the
    job for one of another model and failed to submit a new one, or made one that cannot run here."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    path, params = write_jsonl(tmp_path / "p.jsonl", ROWS), GenerationParams(max_new_tokens=2)
    job = create_job(path, HUB_ID, params)
    newest = main.parent.parent / "snapshots" / max(SNAPSHOTS)
    if cache == "hinted download":
        shutil.rmtree(main.parent)
        shutil.rmtree(newest)
    else:
        main.write_text(max(SNAPSHOTS))
        (newest / "model.safetensors").unlink()
    again, summary = runner.run(path, HUB_ID, params, echo=None)
    assert again.id == job.id and summary.finished and read_state(job.dir).state == "completed"


def _requests(model: str) -> list[dict]:
    """ROWS as OpenAI Batch completion requests that give no max_tokens (the Batch default then)."""
    return [{"custom_id": r["id"], "method": "POST", "url": "/v1/completions",
             "body": {"model": model, "prompt": r["prompt"]}} for r in ROWS]  # fmt: skip


def test_a_batch_file_of_a_revision_takes_its_default_max_tokens_from_that_snapshot(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """A Batch file without max_tokens gets 256 or half the context window: that window was read from main's
    snapshot whatever --revision asked, so offline with a cache of the asked snapshot alone (no refs/main)
    `runner run-batch --revision COMMIT` failed ("cannot load model 'acme/tiny'"), and `runner.submit` with it;
    the window is now the asked snapshot's, as the job's."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    first = min(SNAPSHOTS)
    shutil.rmtree(main.parent)
    batch = write_jsonl(tmp_path / "b.jsonl", _requests(HUB_ID))
    out = tmp_path / "out.jsonl"
    ran = CliRunner().invoke(
        cli, ["run-batch", "-i", str(batch), "-o", str(out), "-m", HUB_ID, "--revision", first]
    )
    assert ran.exit_code == 0, ran.output
    job = Job.open(tmp_path / "out.jsonl.job")
    assert job.spec.revision == first and job.params.max_new_tokens == 128
    again = create_job(batch, HUB_ID, None, revision=first, name="from-python")
    assert again.params.max_new_tokens == 128 and again.spec.revision == first


def test_a_quick_try_of_a_revision_the_cache_lacks_says_so_as_the_option_not_as_a_job(
    tmp_path, tiny_gpt2, monkeypatch
):
    """`runner generate --revision v9` offline, the cache without v9: it said "its model acme/tiny at commit v9,
    the snapshot it was submitted with, is not in this machine's Hugging Face cache", of a job there is not
    and a branch name taken for a commit; it now says the revision the option asked, as submit does."""
    _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    tried = CliRunner().invoke(cli, ["generate", "The old man", "-m", HUB_ID, "--revision", "v9"])
    assert tried.exit_code == 1 and "Traceback" not in tried.output, tried.output
    assert "at revision 'v9' (--revision)" in tried.output and "submitted" not in tried.output, tried.output


def test_a_hub_model_that_fails_to_load_for_another_reason_is_not_told_to_download_its_snapshot(
    tmp_path, tiny_gpt2, runner_home, monkeypatch
):
    """Every hub model's job is pinned now, and any load error of a pinned snapshot ended in "(the job runs on
    the snapshot it was submitted with, commit C: with no network, download it first: hf download ...)": a
    submit (no job yet) of a snapshot that is here whole, refused for its own code without --trust-remote-code,
    was told to download it. The hint is for a hub that could not be reached."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    config = main.parent.parent / "snapshots" / min(SNAPSHOTS) / "config.json"
    own = {
        **json.loads(config.read_text()),
        "model_type": "acme",
        "auto_map": {"AutoConfig": "acme.AcmeConfig"},
    }
    config.write_text(json.dumps(own))
    (config.parent / "acme.py").write_text("from transformers import GPT2Config\n\n\nclass AcmeConfig(GPT2Config):\n"
                                          "    model_type = 'acme'\n")  # fmt: skip
    refused = CliRunner().invoke(cli, ["submit", str(write_jsonl(tmp_path / "p.jsonl", ROWS)), "-m", HUB_ID])
    assert refused.exit_code == 1 and "custom code" in refused.output, refused.output
    assert "hf download" not in refused.output and "submitted with" not in refused.output, refused.output


@pytest.mark.parametrize("command", ["results", "repair"])
def test_a_command_that_needs_the_pinned_snapshot_says_which_to_download(
    tmp_path, tiny_gpt2, runner_home, monkeypatch, command
):
    """The OpenAI export (token texts) and a repair writing lost prompts again read the pinned snapshot's
    tokenizer: offline without it, they said it is not here but not the `hf download ORG/NAME --revision COMMIT`
    that brings it (the hint `runner work` and `runner status` give); they give it now."""
    main = _hub_cache(tmp_path, tiny_gpt2, monkeypatch)
    job = create_job(
        write_jsonl(tmp_path / "b.jsonl", _requests(HUB_ID)), HUB_ID, GenerationParams(max_new_tokens=2)
    )
    assert work(runner_home, echo=None)[0].finished
    if command == "repair":
        (job.dir / PROMPTS).unlink()
    shutil.move(main.parent.parent / "snapshots" / min(SNAPSHOTS), tmp_path / "away")
    args = {"results": ["--format", "openai", "--to", str(tmp_path / "out.jsonl")], "repair": []}[command]
    said = CliRunner().invoke(cli, [command, str(job.dir), *args])
    assert said.exit_code == 1 and "Traceback" not in said.output, said.output
    assert f"hf download {HUB_ID} --revision {min(SNAPSHOTS)}" in said.output, said.output
    shutil.move(tmp_path / "away", main.parent.parent / "snapshots" / min(SNAPSHOTS))
    again = CliRunner().invoke(cli, [command, str(job.dir), *args])
    assert again.exit_code == 0 and read_state(job.dir).state == "completed", again.output
