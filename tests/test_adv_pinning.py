"""Adversarial pass on hub pins (c9fcc78): a hub model's job pinned at submit to a snapshot, with an offline
cache that lacks parts of it, moves under it, or holds another tokenizer."""

import shutil

import pytest
from helpers import write_jsonl
from test_adv_model_changes import HUB_ID, ROWS, SNAPSHOTS, _hub_cache

import runner
from runner import GenerationParams
from runner.jobdir import read_state
from runner.jobs import create_job
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
