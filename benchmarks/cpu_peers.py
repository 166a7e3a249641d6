"""CPU peers as rows of the fixed workload (`--peers openvino,ctranslate2`): what a user without a GPU reaches for
instead of runner, on the same prompts, greedy, float32, exactly --max-new-tokens tokens each. With `--tasks
score`, a peer that has a scoring call (CTranslate2's `score_batch`) is also a row of the score task, on the same
token ids as runner's.

Nothing here imports a peer. Each one runs in its own venv (benchmarks/peers/setup.sh makes it and converts the
model) as a subprocess: benchmarks/peers/run_peer.py reads a request (runner's prompt token ids, so every method
tokenizes identically; max_new_tokens; runner's thread count and default batch size) and answers with the
generated ids and the seconds of a timed pass after a warm-up pass. The answer becomes a row like the others
(`Bench.record`), compared with `runner (default)`: the ratio runner / peer (output tok/s) and token agreement.
A peer that cannot run (no venv, no converted model, a failed run) leaves a note in the report, never a crash.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

from measure import compare

ROWS = {"openvino": "openvino-genai cb", "ctranslate2": "ctranslate2"}  # --peers name -> row name
SCORE_ROWS = {"ctranslate2": "ctranslate2 score_batch"}  # the peers that can score -> score row name
HERE = Path(__file__).resolve().parent / "peers"
RUN_PEER = HERE / "run_peer.py"
PYTHON_ENV = "RUNNER_PEERS_PYTHON"
DEFAULT_PYTHON = HERE / ".venv" / "bin" / "python"
EXPORT_MARKER = "export.json"  # written last by setup.sh into each converted model folder


def parse(value: str) -> list[str]:
    """--peers: comma-separated names of ROWS; raises ValueError naming the option and the value."""
    names = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in names if p not in ROWS]
    if unknown:
        raise ValueError(f"--peers must be a comma-separated list of {', '.join(ROWS)}, got {value!r}")
    return names


def peers_python(option: str | None) -> Path:
    """--peers-python, else $RUNNER_PEERS_PYTHON, else the venv setup.sh makes."""
    return Path(option or os.environ.get(PYTHON_ENV) or DEFAULT_PYTHON)


def export_dir(model_dir: str, peer: str) -> Path:
    """Where setup.sh converts MODEL_DIR for PEER: $RUNNER_CACHE/peers/<model folder name>/<peer>."""
    from runner.models import cache_root

    return cache_root() / "peers" / Path(model_dir).name / peer


def run_all(b) -> None:
    """Each peer of --peers as a row of the fixed workload, or a note saying why it did not run."""
    python = ready(b)
    for peer in b.args.peers if python else []:
        answer = ask(b, peer, python, request(b, peer, export_dir(b.model_dir, peer)))
        if answer is not None:
            record(b, peer, answer)


def scores(b, seqs: list[list[int]], batch_size: int) -> dict[str, dict]:
    """The answer of each peer of --peers that can score, scoring runner's token ids `seqs` (every token after the
    first, given the ones before it): {peer: answer with "outputs" = log-probs per sequence}. Notes for the rest."""
    python = ready(b)
    answers = {}
    for peer in b.args.peers if python else []:
        if peer not in SCORE_ROWS:
            b.res["peers"]["notes"].append(f"{peer}: no score row ({ROWS[peer]} has no scoring call)")
            continue
        req = {"peer": peer, "task": "score", "model_dir": str(export_dir(b.model_dir, peer)), "prompts": seqs,
               "threads": threads(), "batch_size": batch_size, "precision": precision(b)}  # fmt: skip
        answer = ask(b, peer, python, req)
        if answer is not None:
            answers[peer] = answer
    return answers


def ready(b) -> Path | None:
    """The peers venv's python, or None with a note (peers run on CPU only, from a venv setup.sh made)."""
    python = peers_python(b.args.peers_python)
    info = b.res.setdefault("peers", {"requested": b.args.peers, "python": str(python), "notes": []})
    if b.engine.device.type != "cpu":
        info["notes"].append(f"peers skipped: they run on CPU only (this run: {b.engine.device})")
        return None
    if not python.is_file():
        info["notes"].append(f"peers skipped: no peers venv at {python} (create it with bash "
                             f"benchmarks/peers/setup.sh, or point --peers-python / {PYTHON_ENV} at one)")  # fmt: skip
        return None
    return python


def ask(b, peer: str, python: Path, req: dict) -> dict | None:
    """run_peer.py's answer to REQ, or None with a note (no converted model, a failed run)."""
    model = Path(req["model_dir"])
    if not (model / EXPORT_MARKER).is_file():
        b.res["peers"]["notes"].append(f"{peer} skipped: no converted model at {model} (run bash "
                                       f"benchmarks/peers/setup.sh --model {b.model_dir})")  # fmt: skip
        return None
    b.log(f"peer {ROWS[peer]} ({python}, {req.get('task', 'generate')}) ...")
    answer = call(python, req)
    if isinstance(answer, str):
        b.res["peers"]["notes"].append(f"{peer} failed: {answer}")
        b.log(f"  {peer} failed: {answer}")
        return None
    return answer


def threads() -> int:
    import torch

    return torch.get_num_threads()


# runner's dtype -> the precision a peer is asked to compute and keep its KV cache in (equal precision)
PRECISIONS = {"torch.float32": "f32", "torch.bfloat16": "bf16", "torch.float16": "f16"}


def request(b, peer: str, model: Path) -> dict:
    """What run_peer.py needs: runner's token ids, and runner's threads, default batch size and precision."""
    return {"peer": peer, "model_dir": str(model), "prompts": b.ids, "max_new_tokens": b.args.max_new_tokens,
            "threads": threads(), "batch_size": b.defaults()[0],
            "precision": precision(b)}  # fmt: skip


def precision(b) -> str:
    return PRECISIONS[str(b.engine.dtype)]


def call(python: Path, req: dict) -> dict | str:
    """Run run_peer.py on REQ with PYTHON: its answer, or a one-line reason it gave none."""
    with tempfile.TemporaryDirectory(prefix="runner-peer-") as tmp:
        req_path, answer_path = Path(tmp) / "request.json", Path(tmp) / "answer.json"
        req_path.write_text(json.dumps(req))
        proc = subprocess.run([str(python), str(RUN_PEER), str(req_path), str(answer_path)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
        if proc.returncode != 0 or not answer_path.is_file():
            # a traceback's last line names the error
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            return f"run_peer.py exited with {proc.returncode}: {last}"
        return json.loads(answer_path.read_text())


def record(b, peer: str, a: dict) -> None:
    """The answer as a row (peak memory and CPU time are the peer process's, over its timed pass)."""
    outs = a["outputs"]
    mem, use = usage(a)
    extra = {"peer": peer, "versions": a["versions"], "settings": a["settings"],
             "load_seconds": a["load_seconds"], "warmup_seconds": a["warmup_seconds"]}  # fmt: skip
    name = ROWS[peer]
    b.record(name, [len(o) for o in outs], a["seconds"], mem, use, None, a["batches"], b.defaults()[0], extra)
    b.outputs[name] = outs
    short = [i for i, o in enumerate(outs) if len(o) != b.args.max_new_tokens]
    if len(outs) != len(b.ids) or short:
        b.res["peers"]["notes"].append(f"{peer}: {len(outs)} answers for {len(b.ids)} prompts, {len(short)} not "
                                       f"exactly {b.args.max_new_tokens} tokens long")  # fmt: skip


def usage(a: dict) -> tuple[SimpleNamespace, SimpleNamespace]:
    """The peer's peak memory and CPU time over its timed pass, shaped as measure.PeakMemory and Usage."""
    mem = SimpleNamespace(peak=a["peak_memory_bytes"], base=a["peak_memory_bytes"] - a["memory_above_start_bytes"],
                          method=a["memory_method"])  # fmt: skip
    use = SimpleNamespace(user=a["cpu_user_seconds"], sys=a["cpu_sys_seconds"], minflt=a["minor_page_faults"])
    return mem, use


def comparisons(b) -> None:
    """For each peer row: runner default / peer (output tok/s) into the ratios, runner vs peer agreement."""
    res, ref = b.res, b.outputs["runner (default)"]
    tps = next(m for m in res["methods"] if m["name"] == "runner (default)")["tokens_per_second"]
    for row in (m for m in res["methods"] if m.get("peer")):
        res["ratios"][f"runner default / {row['name']}"] = tps / row["tokens_per_second"]
        outs = b.outputs[row["name"]]
        if len(outs) == len(ref):
            res["matches"][f"runner vs {row['name']}"] = compare(ref, outs)
