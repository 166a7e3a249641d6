"""A stand-in CPU peer for tests/test_bench.py: benchmarks/peers/run_peer.py's own protocol (request and answer
JSON, a warm-up and a timed pass, peak memory, CPU time) around a generator that needs no peer installed.

It answers with the token ids in the JSON file $FAKE_PEER_ECHO (one list per prompt: what the test wants it to
say): as "openvino" verbatim (and no batches, as a continuous-batching pipeline), as "ctranslate2" with the last
token of every answer changed. Asked to score (as "ctranslate2"), it gives every token after the first a
log-prob of 0. Its settings repeat what the request carried, so the test can check that the benchmark sent
runner's prompts and settings.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peers"))
import run_peer  # noqa: E402


def load_echo(req: dict):
    echo = json.loads(Path(os.environ["FAKE_PEER_ECHO"]).read_text())
    if req["peer"] == "ctranslate2":
        echo = [o[:-1] + [o[-1] + 1] for o in echo]

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        return echo[: len(prompts)]

    settings = {"prompts": len(req["prompts"]), "prompt_tokens": sum(map(len, req["prompts"])),
                "max_new_tokens": req["max_new_tokens"], "threads": req["threads"],
                "batch_size": req["batch_size"], "precision": req["precision"],
                "batches": None if req["peer"] == "openvino" else 1}  # fmt: skip
    return generate, {"fake-peer": "1.0"}, settings


def load_zero_scores(req: dict):
    def score(seqs: list[list[int]]) -> list[list[float]]:
        return [[0.0] * (len(s) - 1) for s in seqs]

    settings = {"prompts": len(req["prompts"]), "prompt_tokens": sum(map(len, req["prompts"])),
                "threads": req["threads"], "batch_size": req["batch_size"], "precision": req["precision"],
                "batches": 1}  # fmt: skip
    return score, {"fake-peer": "1.0"}, settings


run_peer.PEERS = dict.fromkeys(run_peer.PEERS, load_echo)
run_peer.SCORERS = dict.fromkeys(run_peer.SCORERS, load_zero_scores)
sys.exit(run_peer.main(sys.argv[1:]))
