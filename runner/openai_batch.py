"""OpenAI Batch files: request lines in (as input rows), response lines out (from a job's results).

inputs.PromptReader (a line with custom_id / method / url / body) -> `request_row` -> a plain input row with
its per-row settings -> the usual job. results -> `export` -> one Batch output line per request, shaped as
the OpenAI Batch API writes them (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`).

Every body field is either honoured or refused at submit, naming the line and the field: nothing is dropped
silently. Output ids are derived from the job and the custom_id, and `created` is the job's creation time, so
a resumed job writes the same file byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RunnerError, option
from .params import EngineOptions, GenerationParams, cited_as, settings_apart
from .progress import counted, in_words
from .storage import NAME_MAX
from .tokens import REPLACEMENT, unfinished

if TYPE_CHECKING:
    from .results import Exported

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
URLS = (CHAT, COMPLETIONS, EMBEDDINGS)
# Body field -> input row field (our per-row settings; see params.ROW_SETTINGS), per endpoint.
_SAMPLING = {
    "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "n": "n", "stop": "stop",
    "seed": "seed", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    # vLLM's extra sampling parameters, as `vllm run-batch` accepts them
    "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens",
    # structured output (constraints.py): OpenAI's response_format, and vLLM's guided_* fields
    "response_format": "response_format", "guided_json": "guided_json", "guided_regex": "guided_regex",
    "guided_choice": "guided_choice", "guided_grammar": "guided_grammar",
}  # fmt: skip
FIELDS = {
    CHAT: {**_SAMPLING, "max_completion_tokens": "max_completion_tokens", "messages": "messages"},
    COMPLETIONS: {**_SAMPLING, "prompt": "prompt"},
    EMBEDDINGS: {"input": "text"},
}
# checked or carry nothing that changes output (what a request is billed, cached or logged as; tool-call
# settings with no tools, which runner refuses)
HARMLESS = {"model", "user", "metadata", "store", "stream", "service_tier", "parallel_tool_calls",
            "prompt_cache_key", "safety_identifier"}  # fmt: skip
# fields whose value here asks for nothing: taken; any other value is refused
NOTHING = {"logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
           "function_call": ("none", "auto"), "modalities": (["text"],), "stream_options": ({},)}  # fmt: skip


def is_request(obj: dict[str, Any]) -> bool:
    """A Batch request line (rather than a plain input row): the first line of a file decides for all. It has a
    custom_id, a JSON object for body, or an endpoint's url: a plain row's own `url` (a web page's, as in C4 and
    FineWeb) or text `body` (an email's) made its whole file a Batch file, refused (adversarial pass 163)."""
    if {"prompt", "messages"} & set(obj):
        return False
    url = obj.get("url")
    return (
        "custom_id" in obj
        or isinstance(obj.get("body"), dict)
        or (isinstance(url, str) and url.startswith("/v1/"))
    )


def says_greedy(params: Any) -> bool:
    """The job asks for greedy decoding outright (--greedy, or --temperature 0): requests that give no
    temperature take it, where the API would sample at temperature 1."""
    return getattr(params, "_do_sample_given", None) is False or getattr(params, "temperature", 1.0) == 0


def request_row(
    obj: dict[str, Any],
    kind: str,
    models: tuple[str, ...],
    greedy: bool = False,
    logprobs: bool = False,
    base64: bool = True,
    since_6: bool = True,
    since_9: bool = True,
    since_10: bool = True,
) -> tuple[dict[str, Any] | None, str | None, str]:
    """The input row a Batch request line stands for, or (None, field, problem). `models`: the names
    `body.model` may take (the model given with --model, its folder name, and --served-model-name); `greedy`:
    the job says greedy (`says_greedy`); `logprobs`: the job keeps log-probs (--logprobs), which a request that
    asks none gets; `base64`: an embedding may be asked as base64 (False: refused, as a job read before
    2026-12-06's reading 3 refused it); `since_6`: a body's min_p is taken and a whole float seed (-1.0) is its
    integer (False: min_p refused as unsupported and seed -1.0 as out of range, as a job read before reading 6
    read them); `since_9`: a chat body's top_logprobs true or false is refused (False: taken as 0 and as no
    log-probs, as a job read before reading 9 took them); `since_10`: a /v1/completions body's echo with max_tokens
    0 is refused naming `runner score` (False: as any max_tokens 0, as a job read before reading 10 refused it)."""
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, "custom_id", "must be a non-empty string (every Batch request has one)"
    if not cid.strip():  # (the row's check said "id: must be a non-empty string": a field the line has not)
        return None, "custom_id", "must not be blank (results are keyed by it)"
    extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if extra:
        return None, extra[0], "is not a field of a Batch request line (custom_id, method, url, body)"
    if obj.get("method") != "POST":
        return None, "method", f"must be POST, got {obj.get('method')!r}"
    url = obj.get("url")
    if url not in URLS:
        return None, "url", f"must be one of {', '.join(URLS)}, got {url!r}"
    if (url == EMBEDDINGS) != (kind == "embed") or kind == "score":
        need = (
            "an embed job (`runner embed`, or `runner submit --kind embed`)"
            if url == EMBEDDINGS
            else "a generate job"
        )
        return None, "url", f"{url} requests need {need}"
    body = obj.get("body")
    if not isinstance(body, dict):
        return None, "body", "must be a JSON object"
    if since_10 and url == COMPLETIONS and body.get("echo") is True and _asks_no_tokens(body):
        return None, "body.max_tokens", SCORE_INSTEAD
    return _body_row(cid, url, body, models, greedy, logprobs, base64, since_6, since_9)


# A /v1/completions request with echo and max_tokens 0 asks for its prompt's log-probs only, the OpenAI API's way
# of scoring a text: refused as "max_tokens must be in [1, 1000000]", which said nothing of `runner score`
SCORE_INSTEAD = (
    "0 with echo asks for the prompt's log-probs only (scoring it), which is `runner score`'s work, not a generate "
    "job's (it generates at least one token): score the prompts with jq -c '{id: .custom_id, text: .body.prompt}' "
    "REQUESTS.jsonl > texts.jsonl, then runner score texts.jsonl -m MODEL (each text's logprob, and each token's in "
    "token_logprobs); or give max_tokens >= 1"
)


def _asks_no_tokens(body: dict[str, Any]) -> bool:
    """The body asks for no tokens: max_tokens 0 (or 0.0, as a writer holding numbers as doubles writes it)."""
    n = body.get("max_tokens")
    return isinstance(n, (int, float)) and not isinstance(n, bool) and n == 0


def _body_row(
    cid: str,
    url: str,
    body: dict[str, Any],
    models: tuple[str, ...],
    greedy: bool,
    logprobs: bool,
    base64: bool,
    since_6: bool,
    since_9: bool,
) -> tuple[Any, str | None, str]:
    model = body.get("model")
    if not isinstance(model, str) or model not in models:
        names = " or ".join(repr(m) for m in models)
        return None, "body.model", (f"{model!r} is not the model this job runs ({names}); pass "
                                    f"{option('served_model_names', (model,))} to answer to that name") if isinstance(model, str) else "is missing"  # fmt: skip
    if body.get("stream") not in (None, False):
        return None, "body.stream", "streaming is not available in a batch"
    allowed = FIELDS[url] if since_6 else {k: v for k, v in FIELDS[url].items() if k != "min_p"}
    special = {"logprobs", "top_logprobs", "echo", "encoding_format", "best_of"}
    for key in body:  # (a null one asks for nothing: the SDK's model_dump() writes every field it has)
        if key in allowed or key in HARMLESS or key in special or body[key] is None:
            continue
        if not any(body[key] == v and type(body[key]) is type(v) for v in NOTHING.get(key, ())):
            return None, f"body.{key}", f"is not supported by runner for {url} (it would be ignored)"
    row: dict[str, Any] = {"id": cid}
    for key, field in allowed.items():
        if key in body and body[key] is not None:
            row[field] = body[key]
    seed = row.get("seed")
    if (
        since_6 and isinstance(seed, float) and seed.is_integer()
    ):  # -1.0, as a writer holding numbers as doubles writes -1
        seed = int(seed)
    if isinstance(seed, int) and not isinstance(seed, bool):  # vLLM takes any int64, negative ones too
        if not -(2**63) <= seed < 2**63:
            return None, "body.seed", f"must be a 64-bit integer, in [{-(2**63)}, {2**63 - 1}], got {seed}"
        # its 64 bits as runner's seeds read them (-1: 2**64-1), which no seed from 0 to 2**63-1 is: seed -1 was
        # 2**63-1, and a request seeded -1 answered as one seeded 2**63-1 (mixed with the same custom_id)
        row["seed"] = seed % 2**64
    # the API samples at temperature 1 unless told otherwise (a temperature given decides, in row_params)
    if url != EMBEDDINGS and body.get("temperature") is None and not greedy:
        row["do_sample"] = True
    problem = _special_fields(url, body, row, logprobs, base64, since_9)
    if problem:
        return None, problem[0], problem[1]
    if url == COMPLETIONS and not isinstance(body.get("prompt"), str):
        return None, "body.prompt", "must be one string (lists of prompts or of token ids: one request each)"
    if url == EMBEDDINGS and not isinstance(body.get("input"), str):
        return None, "body.input", "must be one string (a list of inputs: one request each)"
    if url == CHAT and "messages" not in row:
        return None, "body.messages", "is missing"
    # (a field given as null asks for nothing: a refusal of the job's own setting does not name it)
    names = {field: key for key, field in allowed.items() if key != field and body.get(key) is not None}
    if url == CHAT and body.get("top_logprobs") is not None:
        names["logprobs"] = "top_logprobs"
    row["_request"] = {"url": url, "model": model, "echo": bool(body.get("echo")), "names": names}
    if body.get("encoding_format") == "base64":  # (recorded only so: the rows of before read the same)
        row["_request"]["encoding_format"] = "base64"
    return row, None, ""


def body_named(names: dict[str, str] | None, field: str | None, message: str) -> tuple[str | None, str]:
    """A problem's field and message with the row fields Batch body fields were renamed to (`names`, from
    `request_row`: min_new_tokens <- min_tokens) named as the body spells them, in the message too ("min_tokens
    must be <= max_completion_tokens=2", not max_new_tokens=2)."""
    names = names or {}
    if field in names and message.startswith(f"{field} "):
        message = names[field] + message[len(field) :]
    return names.get(field, field) if field else field, cited_as(message, names)


def _n(body: dict[str, Any]) -> Any:
    """The samples a body asks for: 1 where n is absent or null (best_of 1 was refused beside `"n": null`)."""
    return 1 if body.get("n") is None else body["n"]


def _special_fields(
    url: str, body: dict[str, Any], row: dict[str, Any], job_logprobs: bool, base64: bool, since_9: bool
) -> tuple[str, str] | None:
    """logprobs / top_logprobs / echo / best_of / encoding_format: each endpoint spells them its own way.
    `job_logprobs`: the job keeps log-probs, so echo's prompt log-probs are kept for a request that asks none
    (its logprobs began at the completion, while its text held the prompt: adversarial pass 163)."""
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if url == CHAT:
        if lp is not None and not isinstance(lp, bool):  # (0 and 1 equal false and true in Python)
            return "body.logprobs", "must be true or false"
        if top is not None and not lp:
            return "body.top_logprobs", "needs logprobs: true"
        if (
            isinstance(top, bool) and since_9
        ):  # (true was top_logprobs 0, false no log-probs at all: pass 256)
            return (
                "body.top_logprobs",
                f"must be a whole number of alternatives (0-20), got {json.dumps(top)}",
            )
        if lp is not None:  # false: none, whatever the job's --logprobs says (as a plain row's false)
            row["logprobs"] = (top if top is not None else 0) if lp else False
        if body.get("echo") not in (None, False):
            return "body.echo", f"is not supported for {url} (a field of /v1/completions)"
        if body.get("best_of") not in (None, _n(body)):
            return "body.best_of", f"is not a field of {url}"
    elif url == COMPLETIONS:
        if top is not None:
            return "body.top_logprobs", f"is not a field of {url} (use logprobs: N)"
        if isinstance(lp, bool):
            return (
                "body.logprobs",
                f"must be a number of alternatives (0-20) for {url} (true is the chat spelling)",
            )
        if lp is not None:
            row["logprobs"] = lp
        if body.get("echo") not in (None, True, False):
            return "body.echo", "must be true or false"
        if body.get("echo"):
            row["prompt_logprobs"] = lp is not None or job_logprobs
        if body.get("best_of") not in (None, _n(body)):
            return "body.best_of", "is not supported (only best_of = n)"
    else:
        for key in ("logprobs", "top_logprobs", "echo", "best_of"):
            if body.get(key) is not None:  # (null asks for nothing, as the SDK's model_dump() writes it)
                return f"body.{key}", f"is not a field of {url}"
        if body.get("encoding_format") not in (None, "float", *(["base64"] if base64 else [])):
            return "body.encoding_format", "must be float or base64" if base64 else "only float is supported"
    if url != EMBEDDINGS and body.get("encoding_format") is not None:
        return "body.encoding_format", f"is not a field of {url}"
    return None


# --- output ------------------------------------------------------------------------------------------------


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _key(job: Any) -> str:
    """What response ids derive from: the job's inputs and settings (its fingerprint), so a resumed job and a
    new run of the same file with the same settings write the same ids."""
    return str(job.meta.get("fingerprint") or job.id)


def export(job: Any, out: str | os.PathLike, errors_out: str | os.PathLike | None = None) -> Exported:
    """Write the job's results as Batch output lines (one per request, in input order) to `out`, and the
    requests that could not be done as Batch error lines to `errors_out` (default: beside `out`, `.errors`
    inserted before the suffix). Both files are written whole or not at all. Returns how many of each."""
    from . import storage
    from .results import Unstreamable, load_results, results_streamed

    if job.kind not in ("generate", "embed"):
        raise RunnerError(
            f"job {job.id} is a {job.kind} job and OpenAI Batch has no {job.kind} endpoint, so it has no "
            f"--format openai form; export its rows with `runner results {shlex.quote(str(job.dir))} --to FILE.jsonl`"
        )
    _check_prompts(job)
    out, errors_out = _export_targets(out, errors_out, job.dir)
    for target in (out, errors_out):  # an earlier export killed mid-way left these beside them
        storage.remove_stale_temps_of(target)
    ledger, ending = _ledger_and_ending(job)
    lost = ledger.lost_rows() if ending else {}  # (a complete job with rows lost is refused: _ending)
    try:
        return _export(
            job, out, errors_out, ledger, ending, lost, _Groups(results_streamed(job.dir, None, []))
        )
    except Unstreamable:  # (shards no worker writes: the rows read whole, as before they were streamed)
        whole = load_results(job.dir, format="arrow")
        return _export(job, out, errors_out, ledger, ending, lost, _Groups([whole]))


def _export(job: Any, out: Path, errors_out: Path, ledger: Any, ending: Any, lost: Any, groups: _Groups
            ) -> Exported:  # fmt: skip
    """`export` once its targets and the job's ledger are read: the two files written from `groups`."""
    from . import jobdir, storage
    from .results import LOCAL_EXPORT_PREFIX, Exported, local_temp_prefix, sweep_killed_local_temps

    created = _created(job)
    errors: list[dict[str, Any]] = []
    # Lines refused at submit (--skip-invalid) are not requests of the job: each is an error line of its own,
    # in input order among the others. Only a row error of the run fails a request by its id.
    everything = jobdir.read_errors(job, ledger)
    refused = sorted((e for e in everything if e.get("stage") == "validate"), key=_line_number)
    failed = _by_request(e for e in everything if e.get("stage") != "validate")
    texts = _token_text(job) if job.kind == "generate" else None
    at, written = 0, 0
    sweep_killed_local_temps(LOCAL_EXPORT_PREFIX)  # (a SIGKILL skips the cleanup: a copy of a whole output)
    with tempfile.TemporaryDirectory(prefix=local_temp_prefix(LOCAL_EXPORT_PREFIX)) as tmp:
        lines_file = Path(tmp) / "lines.jsonl"  # written line by line, then copied into place whole
        with open(lines_file, "w", encoding="utf-8") as lines:
            for row, (cid, req, prompt_ids, line, n) in enumerate(_requests(job)):
                while at < len(refused) and line is not None and _line_number(refused[at]) < line:
                    errors.append(_refused_line(job, refused[at]))
                    at += 1
                # a request answers whole or not at all (one response per request): one failed sample fails
                # it, and one not done (a cancelled or failed job) leaves it unanswered. All its samples in the
                # results (read after the errors) answer it: a retry computed them since its error was read
                have = groups.count(cid, row)
                if have >= n:
                    answer = _line(job, cid, req, groups.take(cid), created, texts, prompt_ids)
                    lines.write(json.dumps(answer, ensure_ascii=False) + "\n")
                    written += 1
                elif cid in failed:
                    errors.append(_error_line(job, cid, failed[cid], have))
                elif ending is not None:
                    errors.append(_unfinished_line(job, cid, ending, have, n, lost.get(row)))
                else:  # the ledger counted it done, but its shard no longer verifies
                    raise RunnerError(
                        f"job {job.id}: request {cid!r} has {have} of its {counted(n, 'samples')} in the results; "
                        f"`runner repair {shlex.quote(str(job.dir))}` re-queues what is missing, then `runner work --job "
                        f"{shlex.quote(str(job.dir))}`"
                    )
        errors.extend(_refused_line(job, e) for e in refused[at:])
        groups.finish()
        errors_file = Path(tmp) / "errors.jsonl"
        errors_file.write_text(
            "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in errors), encoding="utf-8"
        )
        # Both files are whole beside their names before either older one is touched (a full disk leaves the
        # older pair as it was); the old pair goes first and the new output comes last, so a kill in between
        # leaves no output (run it again), never a file of this export beside one of an older (pass 47)
        with storage.staged_publish(errors_file, errors_out) as place_errors:
            with storage.staged_publish(lines_file, out) as place_lines:
                storage.remove(out)
                storage.remove(errors_out)
                place_errors()
                place_lines()
    return Exported(written, len(errors))


def _export_targets(
    out: str | os.PathLike, errors_out: str | os.PathLike | None, job_dir: Path, requests: Any = None
) -> tuple[Path, Path]:
    """The output file and the errors file (default beside it), checked before anything is written: an older
    export stays whole when this one cannot be made. Neither may be in the job's folder (`job_dir`: its files
    are runner's own) nor be the input file (`requests`): pass 93, run-batch wrote over both."""
    from .results import check_export_pair

    out, errors = _spared_targets(out, errors_out, job_dir, requests)
    check_export_pair(out, errors)
    return out, errors


def _spared_targets(
    out: str | os.PathLike, errors_out: str | os.PathLike | None, job_dir: Path, requests: Any = None
) -> tuple[Path, Path]:
    """`_export_targets` less the check that their folder is there (run-batch makes it with its job folder)."""
    out = Path(out)
    if out.suffix.lower() != ".jsonl":  # (it wrote JSON Lines under any name: out.parquet was no Parquet)
        raise RunnerError(f"{out}: an OpenAI Batch output file is JSON Lines: give it a .jsonl name")
    errors = (
        Path(errors_out) if errors_out else out.with_name(out.stem + ".errors" + (out.suffix or ".jsonl"))
    )
    if errors.suffix.lower() != ".jsonl":  # (--errors-to x.csv was JSON Lines too)
        raise RunnerError(f"{errors}: an OpenAI Batch error file is JSON Lines: give it a .jsonl name")
    from .results import refuse_inside_job, same_file

    refuse_inside_job(job_dir, out, errors)
    for target in (out, errors):
        # (run-batch ran the whole batch, then failed its export "File name too long", and so every run again)
        if len(os.fsencode(target.name)) > NAME_MAX:
            raise RunnerError(f"{target}: its name is over the {NAME_MAX} bytes a file name may have; give the "
                              "output a shorter name")  # fmt: skip
        if requests is not None and same_file(target, requests):
            raise RunnerError(f"{target} is the input file {requests}: writing it would destroy the requests; "
                              "give the output another name")  # fmt: skip
    return out, errors


class _Groups:
    """The results' rows of each request id, as Python dicts, read a unit of the job at a time
    (`results.results_streamed`, `_row` kept) and turned into dicts a few thousand rows at a time, in the order
    the requests are read (input order): the export holds a unit and a chunk, not the whole job (pass 46: the
    whole job in pandas took 20x the output file's size; pass 266: the whole table in Arrow, ~0.7 KB a row). As
    dicts, not a DataFrame a request: pandas' rows cost ~2 ms a request (a million requests, 35 minutes)."""

    def __init__(self, parts: Any) -> None:
        from collections import Counter, deque

        self.counts: Counter[str] = Counter()
        self._parts = iter(parts)
        self._last = -1  # the last row of the parts read (-1: none yet)
        self._pending: deque[Any] = deque()  # batches of the parts read, not yet dicts
        self._ready: dict[str, list[dict[str, Any]]] = {}

    def count(self, cid: str, row: int) -> int:
        """How many rows request `cid` (row `row` of the prompts) has: the parts read up to a row after it (a
        unit's part holds all its rows) or to the end."""
        while self._last < row and self._read_part():
            pass
        return self.counts.get(cid, 0)

    def finish(self) -> None:
        """Read the parts to their end (then `results_streamed` says whether rows are missing)."""
        while self._read_part():
            pass

    def take(self, cid: str) -> list[dict[str, Any]]:
        """The rows of request `cid` (`count` asked first), in (row, sample) order."""
        while len(self._ready.get(cid, ())) < self.counts.get(cid, 0) and self._more():
            pass
        return self._ready.pop(cid)

    def _read_part(self) -> bool:
        from .jobdir import ORDER

        part = next(self._parts, None)
        if part is None:
            return False
        if part.num_rows and ORDER in part.column_names:
            self._last = part.column(ORDER)[-1].as_py()
        part = part.drop([ORDER]) if ORDER in part.column_names else part
        self.counts.update(part.column("id").to_pylist())
        self._pending.extend(part.to_batches(max_chunksize=4096))
        return True

    def _more(self) -> bool:
        while not self._pending and self._read_part():
            pass
        if not self._pending:
            return False
        for r in self._pending.popleft().to_pylist():
            self._ready.setdefault(r["id"], []).append(r)
        return True


def _ledger_and_ending(job: Any) -> tuple[Any, tuple[str, str] | None]:
    """The job's ledger and `_ending` from it, read as one: its state first (a completion recorded since then
    finds every row in the ledger read next), read again when a command or a worker changed it meanwhile (pass
    94: a job completing while its export read it was said to have lost rows, with `runner repair` advised)."""
    from . import jobdir

    for _ in range(3):
        state = jobdir.state_as_read(job)[0]  # (a change of state being written: the job as it was before it)
        ledger = jobdir.read_ledger(job, generation=state.generation)
        progress = jobdir.job_progress(job, ledger)
        if progress.complete or jobdir.state_as_read(job)[0] == state:
            break
    return ledger, _ending(job, progress, state)


def _ending(job: Any, progress: Any, state: Any) -> tuple[str, str] | None:
    """None when every request of the job is done or failed. Else, for a cancelled (or failed) job, the
    (code, message) of the error line of each request left unfinished, as the OpenAI Batch API marks those of
    a cancelled or expired batch; a job still queued or running is refused (its file would leave requests out).
    `state`: the job's state, read before `progress`."""
    from .jobdir import JobState

    if progress.complete:
        return None
    ref = shlex.quote(str(job.dir))
    if state.state is JobState.CANCELLED:
        return "batch_cancelled", f"This request was not executed because job {job.id} was cancelled"
    if state.state is JobState.FAILED:
        why = f" ({state.error.splitlines()[0]})" if state.error else ""
        return "batch_failed", f"This request was not executed because job {job.id} failed{why}"
    if state.state is JobState.COMPLETED:
        from .job_status import missing_rows

        # (naming the commit that failed, or the unit done/ lacks a commit of: "rows are missing" named no file)
        why = missing_rows(job, progress, progress.total - progress.done - progress.failed)
        raise RunnerError(f"job {job.id} is {why}; then `runner work --job {ref}` computes them")
    raise RunnerError(
        f"job {job.id} is not finished ({progress.done:,}/{progress.total:,} rows); its OpenAI Batch output would "
        f"leave requests out: finish it with `runner work --job {ref}`, or `runner results {ref} --to FILE.jsonl` "
        "exports the rows done so far"
    )


def _unfinished_line(
    job: Any, cid: str, ending: tuple[str, str], have: int, n: int, lost: tuple[str, str] | None = None
) -> dict[str, Any]:
    """The error line of a request a cancelled or failed job left unfinished: `response` null and `error`
    {code, message}, the OpenAI Batch API's shape for the requests of a cancelled or expired batch. `lost`:
    (commit, why) of the commit its rows were lost with (`Ledger.lost_rows`): computed, not "not executed",
    they are a matter of `runner repair`, not of the cancel."""
    code, message = _lost(job, *lost) if lost else ending
    if have:
        message += f" ({have} of its {n} samples were generated and are left out)"
    line_id, _ = _ids(job, cid)
    return {
        "id": line_id,
        "custom_id": cid,
        "response": None,
        "error": {"code": code, "message": message + "."},
    }


def _lost(job: Any, commit: str, why: str) -> tuple[str, str]:
    ref = shlex.quote(str(job.dir))
    return "result_lost", (
        f"This request was computed, but its result was lost: commit {commit} of job {job.id} failed "
        f"verification ({why}); `runner repair {ref}` sets it aside, then `runner retry {ref}` and "
        f"`runner work --job {ref}` compute it again"
    )


def _check_prompts(job: Any) -> None:
    """The requests come from prompts.parquet (the results hold no url, model or echo): it must be the file
    submit wrote, or the output would answer other requests, or none. It is hashed unless this process hashed
    it (a worker of `run-batch`), and read against that hash (`_prompt_groups`): verified.json's stamp was
    trusted, and a file changed under unchanged times (bit rot, another job's put in its place) answered its
    requests, another `model` and other log-probs, with exit 0 (adversarial pass 208)."""
    from . import jobdir

    why = jobdir.prompts_problem(job)
    if why:
        raise jobdir.BrokenJob(_prompts_hint(job, why), repairable=False)


def _prompts_hint(job: Any, why: str) -> str:
    return (f"{why}. Its OpenAI Batch output cannot be written without it; its results are in their shards: "
            f"`runner results {shlex.quote(str(job.dir))} --to FILE.jsonl` still exports them")  # fmt: skip


def _token_text(job: Any) -> Any:
    """Token texts in place and their bytes (tokens.TokenText), from the job's tokenizer."""
    from .models import load_tokenizer
    from .tokens import TokenText

    return TokenText(load_tokenizer(job.spec.model, job.options.trust_remote_code, job.spec.revision))


def _requests(job: Any) -> Iterator[tuple[str, dict[str, Any], list[int], int | None, int]]:
    """(custom_id, request info, prompt token ids, input line, samples asked) of every valid request, in input
    order."""
    import pyarrow as pa

    from .errors import first_line
    from .jobdir import BrokenJob

    default_k = job.meta.get("params", {}).get("logprobs")
    served = job.meta.get("input", {}).get("served_model_names") or ()
    plain = plain_request(_plain_url(job), job.spec.model, served)  # a row that was no Batch request
    try:
        for batch in _prompt_groups(job, ["id", "input_ids"], ["request", "settings", "line", "n"]):
            cols = batch.schema.names
            ids, prompts = batch.column("id").to_pylist(), batch.column("input_ids").to_pylist()
            reqs = batch.column("request").to_pylist() if "request" in cols else [None] * len(ids)
            sets = batch.column("settings").to_pylist() if "settings" in cols else [None] * len(ids)
            at = batch.column("line").to_pylist() if "line" in cols else [None] * len(ids)
            ns = batch.column("n").to_pylist() if "n" in cols else [job.spec.samples] * len(ids)
            for cid, req, prompt_ids, own, line, n in zip(ids, reqs, prompts, sets, at, ns, strict=True):
                info = {**plain, **json.loads(req)} if req else dict(plain)
                info["k"] = json.loads(own).get("logprobs", default_k) if own else default_k
                yield cid, info, prompt_ids, line, int(n or 1)
    except (pa.ArrowException, KeyError, ValueError) as e:  # a job stored before prompts had a checksum
        why = f"prompts.parquet of job {job.id} is damaged ({first_line(e)})"
        raise BrokenJob(_prompts_hint(job, why), repairable=False) from None
    except BrokenJob as e:  # (read_checked: a file pyarrow cannot parse, or one changed while read)
        raise BrokenJob(_prompts_hint(job, str(e)), repairable=False) from None


def plain_request(url: str, model: str, served: Any = ()) -> dict[str, Any]:
    """What a row that was no Batch request answers as: `url`, and in `model` the first of the `served` names
    (--served-model-name), as vLLM's run-batch answers, else the model as given. prompts.parquet records this
    per row (jobs.py `_Preparer._request`) in the shape of a request's own, so a runner of before 2026-12-06
    (which reads `model` and `echo` of any request recorded) exports such a job too."""
    return {"url": url, "model": next((n for n in served if n), model), "echo": False}


def _plain_url(job: Any) -> str:
    """The endpoint a row that was no Batch request answers as where prompts.parquet does not say it per row
    (jobs.py `_request`; jobs submitted before 2026-12-06): an embedding; a chat completion where the job's rows
    went through the chat template (messages, `--chat`); else a text completion, as the prompt was continued as
    typed (a job submitted before runner recorded either: a chat completion, as then)."""
    if job.kind != "generate":
        return EMBEDDINGS
    return CHAT if job.meta.get("input", {}).get("messages", True) else COMPLETIONS


def _prompt_groups(job: Any, columns: list[str], optional: list[str]) -> Iterator[Any]:
    """prompts.parquet's `columns` and those of `optional` it has, a row group at a time, each read retried (a
    retry opens the file again): a transient error never ends the requests early, nor raises a raw OSError.
    Its bytes are checked against the hash `_check_prompts` made (Job.read_checked)."""
    import pyarrow.parquet as pq

    meta = job.read_checked(pq.read_metadata)
    names = meta.schema.to_arrow_schema().names
    columns = columns + [c for c in optional if c in names]

    def group(source: Any, i: int) -> Any:
        with pq.ParquetFile(source, metadata=meta) as pf:
            return pf.read_row_group(i, columns=columns)

    for i in range(meta.num_row_groups):
        yield job.read_checked(lambda source, i=i: group(source, i))


def _created(job: Any) -> int:
    """`created` of every response: when the request file was last written (recorded at submit), so the same
    requests give the same bytes in a resumed job and in a new run of the same file alike."""
    mtime = job.meta.get("input", {}).get("mtime")
    if isinstance(mtime, (int, float)):
        return int(mtime)
    try:
        return int(time.mktime(time.strptime(job.spec.created[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return 0


def _line(
    job: Any, cid: str, req: dict[str, Any], rows: Any, created: int, texts: Any, prompt_ids: list[int]
) -> dict[str, Any]:
    url = req["url"]
    if url == EMBEDDINGS:
        body = _embedding(job, cid, req, rows, created)
    else:
        body = _completion(job, cid, req, rows, created, texts, prompt_ids)
    line_id, request_id = _ids(job, cid)
    return {
        "id": line_id,
        "custom_id": cid,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


def _line_number(error: dict[str, Any]) -> int:
    line = error.get("line")
    return line if type(line) is int else 0


def _refused_line(job: Any, error: dict[str, Any]) -> dict[str, Any]:
    """The Batch error line of a request line refused at submit (errors.jsonl): status 400, the message naming
    the line and the field as submit did. Its custom_id is the line's own when it had a readable one (a
    duplicate shares it with the request answered), else null; its ids derive from the line number too."""
    cid = error.get("id") if isinstance(error.get("id"), str) else None
    field, line = error.get("field"), _line_number(error)
    field = "custom_id" if field == "id" else field  # a Batch line's id is its custom_id
    message = f"line {line}: " + (f"{field}: " if field else "") + str(error.get("message", ""))
    body = {"error": {"message": message, "type": "invalid_request_error", "param": field,
                      "code": str(error.get("error") or "invalid_input")}}  # fmt: skip
    line_id, request_id = _ids(job, cid, line)
    return {"id": line_id, "custom_id": cid,
            "response": {"status_code": 400, "request_id": request_id, "body": body}, "error": None}  # fmt: skip


def _ids(job: Any, cid: str | None, line: int | None = None) -> tuple[str, str]:
    """(line id, request id) of a request's output line; a line refused at submit adds its line number, so that
    a duplicate custom_id gets ids of its own."""
    parts = (_key(job), cid or "", *((f"line {line}",) if line is not None else ()))
    return f"batch_req_{_digest(*parts, 'line')}", _digest(*parts, "request")


def _by_request(errors: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Row errors by request (custom_id): one per failed sample."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in errors:
        out.setdefault(e["id"], []).append(e)
    return out


def _error_line(job: Any, cid: str, errors: list[dict[str, Any]], done: int = 0) -> dict[str, Any]:
    """The Batch error line of a request that run-time row errors failed (500; a line refused at submit is
    `_refused_line`): `errors`, one per failed sample; `done`: how many of its other samples were generated
    (left out). Each failed sample is named; the message is the first one's."""
    errors = sorted(errors, key=lambda e: e.get("sample") or 0)
    message = str(errors[0].get("message", ""))
    if done:
        numbers = [str((e.get("sample") or 0) + 1) for e in errors]
        named = in_words(numbers)
        message = (f"sample{'s' if len(numbers) > 1 else ''} {named} failed: {message} "
                   f"({counted(done, 'other samples', 'were')} generated)")  # fmt: skip
    body = {"error": {"message": message, "type": "server_error", "param": errors[0].get("field"),
                      "code": str(errors[0].get("error", "error"))}}  # fmt: skip
    line_id, request_id = _ids(job, cid)
    return {
        "id": line_id,
        "custom_id": cid,
        "response": {"status_code": 500, "request_id": request_id, "body": body},
        "error": None,
    }


def _completion(job: Any, cid: str, req: dict[str, Any], rows: Any, created: int, texts: Any,
                prompt_ids: list[int]) -> dict[str, Any]:  # fmt: skip
    chat = req["url"] == CHAT
    choices = []
    for r in rows:
        toks = texts.pieces(r["token_ids"], prompt_ids)
        if chat:
            held = texts.held_before(r["token_ids"], prompt_ids)
            lp = _chat_logprobs(r, toks, texts.bytes(r["token_ids"]), req["k"] or 0, held)
        else:
            lp = _text_logprobs(r, req, texts, toks, prompt_ids)
        if chat:
            choices.append({"index": int(r["sample"]), "message": {"role": "assistant", "content": r["text"],
                            "refusal": None}, "finish_reason": r["finish_reason"], "logprobs": lp})  # fmt: skip
        else:
            text = (r["prompt"] + r["text"]) if req.get("echo") else r["text"]
            choices.append(
                {"index": int(r["sample"]), "text": text, "finish_reason": r["finish_reason"], "logprobs": lp}
            )
    prompt_tokens = int(rows[0]["prompt_tokens"])
    completion_tokens = sum(int(r["completion_tokens"]) for r in rows)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{_digest(_key(job), cid)}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": req["model"],
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },  # fmt: skip
        # every OpenAI response has one (vLLM's run-batch writes null): code read it as body["system_fingerprint"]
        "system_fingerprint": None,
    }


def _tops(r: Any) -> list[list[dict[str, Any]]] | None:
    tops = r.get("top_logprobs") if hasattr(r, "get") else None
    if tops is None or (hasattr(tops, "__len__") and len(tops) == 0 and r["completion_tokens"]):
        return None
    return [[dict(t) for t in step] for step in tops]


def _chat_logprobs(
    r: Any, pieces: list[str], raw: list[bytes], k: int, held: list[bytes]
) -> dict[str, Any] | None:
    """`logprobs.content`: per token its text in place, its exact bytes (a character split over tokens is
    rebuilt by joining them) and the K most likely alternatives. A token that leaves a character unfinished
    reads "" (`_chat_token`), the chosen one and every alternative alike, as vLLM writes them."""
    tops = _tops(r)
    if tops is None:
        return None
    content = []
    for i, lp in enumerate(r["token_logprobs"]):
        alts = tops[i][:k] if i < len(tops) else []  # the K most likely (the chosen token follows them)
        content.append({"token": _chat_token(pieces[i], raw[i], held[i]), "logprob": float(lp),
                        "bytes": list(raw[i]),
                        "top_logprobs": [{"token": _chat_token(t["token"], bytes(_alt_bytes(t)), held[i]),
                                          "logprob": float(t["logprob"]), "bytes": _alt_bytes(t)}
                                         for t in alts]})  # fmt: skip
    return {"content": content, "refusal": None}


def _chat_token(text: str, raw: bytes, held: bytes) -> str:
    """A chat logprobs token's text: its text in place, without the "\ufffd" that a character it leaves
    unfinished shows where nothing follows (an alternative, the last token the length cut). The chosen token
    read "" mid-text but "\ufffd" in its own `top_logprobs` entry, so a client did not find it there."""
    if text.endswith(REPLACEMENT) and unfinished(held, raw):
        return text[: -len(REPLACEMENT)]
    return text


def _alt_bytes(entry: dict[str, Any]) -> list[int]:
    raw = entry.get("bytes")  # shards written before `bytes` was recorded have only the text
    return [int(b) for b in raw] if raw is not None else list(entry["token"].encode("utf-8"))


def _text_logprobs(r: Any, req: dict[str, Any], texts: Any, pieces: list[str], prompt_ids: list[int]) -> Any:
    """`logprobs` of a text completion (None when none were kept); with echo the prompt's tokens come first.
    `pieces`: each generated token's text in place, which `text_offset` counts (in characters of the echoed
    text); `tokens` and the `top_logprobs` keys name each token by `_token_name` (a byte-fallback token that
    spells what another token spells by its bytes: `TokenText.byte_twins`)."""
    tops = _tops(r)
    if tops is None:
        return None
    twins = texts.byte_twins
    tokens, lps, top_list, offsets = [], [], [], []
    at = len(r["prompt"]) if req.get("echo") else 0
    if req.get("echo") and r.get("prompt_logprobs") is not None:
        prompt_pieces = texts.pieces(prompt_ids)
        special = set(getattr(texts.tokenizer, "all_special_tokens", ()))
        starts = _prompt_offsets(r["prompt"], prompt_pieces, special)
        names = _token_names(prompt_pieces, texts.bytes(prompt_ids), prompt_ids, twins)
        # The prompt's tokens come first. The first one has no log-prob (nothing before it): the openai
        # types allow no null there, so it is left out, as are alternatives we do not compute for prompts.
        for j, lp in enumerate(r["prompt_logprobs"]):
            if lp is None or lp != lp:
                continue
            tokens.append(names[j] if j < len(names) else "")
            lps.append(float(lp))
            top_list.append({})
            offsets.append(starts[j] + _lead(prompt_pieces[j], tokens[-1]) if j < len(starts) else at)
    names = _token_names(pieces, texts.bytes(r["token_ids"]), r["token_ids"], twins)
    for i, lp in enumerate(r["token_logprobs"]):
        tokens.append(names[i] if i < len(names) else "")
        lps.append(float(lp))
        step = _with_chosen(tops[i], req["k"] or 0, r["token_ids"][i]) if i < len(tops) else []
        # (the chosen token keyed as `tokens` names it, so its entry there is its log-prob)
        top_list.append({tokens[-1] if t.get("token_id") == r["token_ids"][i] else _alt_name(t, twins):
                         float(t["logprob"]) for t in step})  # fmt: skip
        piece = pieces[i] if i < len(pieces) else ""
        offsets.append(at + _lead(piece, tokens[-1]))
        at += len(piece)  # (its text in place, not its name: offsets count characters of the text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_list, "text_offset": offsets}


def _token_name(text: str, raw: bytes | None) -> str:
    """A completion token as `logprobs.tokens` and the `top_logprobs` keys name it, as the OpenAI API does: its
    text, or, where its bytes are not UTF-8 on their own (part of a character split over byte tokens),
    "bytes:" and those bytes as \\xNN escapes ("bytes:\\xe3\\x81"). By text, every such token read "\ufffd" (or
    "" in place), and `top_logprobs`, one key per name, kept one of them with another's log-prob (pass 158)."""
    if raw is None:  # (shards written before `bytes` was recorded: the text is all there is)
        return text
    try:
        own = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _bytes_name(raw)
    # read in place after a character left unfinished, it shows that character's "\ufffd" first: not its own
    lead = text[: len(text) - len(own)] if len(text) > len(own) and text.endswith(own) else ""
    return own if lead and set(lead) == {"\ufffd"} else text


def _lead(piece: str, name: str) -> int:
    """Where a token named `name` starts in its text in place `piece`: after the "\ufffd" of an unfinished
    character before it that `_token_name` leaves out (0 for a "bytes:" name: at its character)."""
    return len(piece) - len(name) if name != piece and piece.endswith(name) else 0


def _token_names(pieces: list[str], raw: list[bytes], ids: Any, twins: frozenset[int]) -> list[str]:
    ids = [int(i) for i in ids]
    return [_bytes_name(b) if i < len(ids) and ids[i] in twins else _token_name(p, b)
            for i, (p, b) in enumerate(zip(pieces, raw, strict=False))]  # fmt: skip


def _alt_name(entry: dict[str, Any], twins: frozenset[int]) -> str:
    raw = entry.get("bytes")
    raw = None if raw is None else bytes(int(b) for b in raw)
    if raw is not None and entry.get("token_id") in twins:
        return _bytes_name(raw)
    return _token_name(entry["token"], raw)


def _bytes_name(raw: bytes) -> str:
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _with_chosen(step: list[dict[str, Any]], k: int, chosen: int) -> list[dict[str, Any]]:
    """A completion's `top_logprobs` entry: the K most likely tokens and the chosen one, which the API always
    returns ("up to logprobs+1 elements"; with logprobs 0, the chosen token alone)."""
    return step[:k] + [t for t in step[k:] if t.get("token_id") == chosen][:1]


def _prompt_offsets(prompt: str, pieces: list[str], special: set[str]) -> list[int]:
    """Where each prompt piece starts in the echoed prompt text, placed back from its end: the tokens the model
    read end where the prompt ends, but may start after its start (`--truncate left` keeps the end; a
    SentencePiece tokenizer drops a leading space; a literal "<s>" may be read as the BOS token). Placed from
    the start, they pointed at other text (adversarial pass 121). A special token's piece that the text does
    not hold there (the BOS the tokenizer added: "<s>" is not in "The old man") takes no room. Pieces that are
    not the text there (a tokenizer that normalises it) are placed from the start, one after the other."""
    offsets, at = [0] * len(pieces), len(prompt)
    for j in range(len(pieces) - 1, -1, -1):
        start = _placed_before(prompt, pieces[j], at)
        if start is not None:
            at = start
        elif pieces[j] not in special:
            return _offsets_from_start(prompt, pieces, special)
        offsets[j] = at
    return offsets


def _placed_before(prompt: str, piece: str, at: int) -> int | None:
    """Where `piece` starts if the text ends with it at `at`, or just before white space there that the
    tokenizer dropped (SentencePiece after a special token: "<s> literal" reads "<s>", "lit", ...); None if not."""
    end = at
    while end > 0 and prompt[end - 1].isspace():
        end -= 1
    for stop in (at, end) if end < at else (at,):
        if stop >= len(piece) and prompt.startswith(piece, stop - len(piece)):
            return stop - len(piece)
    return None


def _offsets_from_start(prompt: str, pieces: list[str], special: set[str]) -> list[int]:
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        if piece in special and not prompt.startswith(piece, at):
            continue
        at += len(piece)
    return offsets


def _embedding(job: Any, cid: str, req: dict[str, Any], rows: Any, created: int) -> dict[str, Any]:
    """An embedding response: the vector as numbers, or with `encoding_format: base64` as the API sends it,
    its float32 values little-endian in base64 (what the openai SDK decodes with numpy.frombuffer)."""
    import base64

    import numpy as np

    r = rows[0]
    n = int(r["num_tokens"])
    vector: Any = [float(x) for x in r["embedding"]]
    if req.get("encoding_format") == "base64":
        vector = base64.b64encode(np.asarray(r["embedding"], dtype="<f4").tobytes()).decode("ascii")
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector}],
        "model": req["model"],
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }


def file_kind(path: str | os.PathLike) -> str:
    """The job kind a Batch file needs: embed for /v1/embeddings requests, else generate (from its first
    request line; a line of the other kind is then refused with its line number). A file that is not a Batch
    file is refused, as `vllm run-batch` does: its rows ran as plain prompts, answered as chat completions."""
    from .errors import InputError, Problem
    from .inputs import SUFFIXES, iter_jsonl

    path = Path(path)
    if not path.is_file():
        return "generate"  # (the reader names what is wrong)
    if SUFFIXES.get(path.suffix.lower()) != "jsonl":
        why = (
            "an OpenAI Batch file is JSON lines: name it .jsonl (`runner run` takes prompt files of any kind)"
        )
        raise InputError([Problem(str(path), 0, None, why)], header="not a Batch file")
    for lineno, obj, _ in iter_jsonl(path):
        if isinstance(obj, dict) and not is_request(obj):
            why = ("not an OpenAI Batch request line (custom_id, method, url, body); `runner run` takes prompt "
                   "files")  # fmt: skip
            raise InputError([Problem(str(path), lineno, None, why)], header="not a Batch file")
        if isinstance(obj, dict) and obj.get("url") == EMBEDDINGS:
            return "embed"
        if obj is not None:
            break
    return "generate"


def is_batch_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a prompt file (JSON lines or Parquet) whose first row is an OpenAI Batch request line,
    as the reader decides what a file is; False for anything else, which the reader then reads or names."""
    from .inputs import PromptReader

    if not Path(path).is_file():
        return False
    try:
        first = PromptReader(path).first_row()
    except (RunnerError, OSError, UnicodeDecodeError):  # (the reader says what is wrong with it)
        return False
    return isinstance(first, dict) and is_request(first)


def input_seed(sha256: str) -> int:
    """The seed `run-batch` gives a job whose settings give none: from its input file's sha256, as create_job
    hashed the bytes it read (hashed before by run_batch, a file written meanwhile gave the job the seed of the
    file as it was: the same command, run again, was refused "seed A, now B", and a clean run of the file wrote
    other bytes; adversarial pass 208)."""
    return int(sha256[:15], 16)


def default_max_tokens(model: str, trust_remote_code: bool = False, revision: str | None = None) -> int:
    """max_tokens for requests that set none: 256, or half the model's context window if that is smaller (a hub
    model's at `revision`, a branch, tag or commit, as its job's)."""
    from .models import asked_snapshot, context_window, load_config

    window = context_window(load_config(model, trust_remote_code, asked_snapshot(model, revision)))
    return min(256, window // 2) if window else 256


@settings_apart("run_batch", (GenerationParams, EngineOptions))
def run_batch(input_path: Any, output_path: Any, model: str, params: Any, options: Any, *, job_dir: Any = None,
              served_model_names: tuple[str, ...] = (), echo: Any = print, stop: Any = None,
              skip_invalid: bool = False, chat_template: str | None = None,
              truncate: str = "none", progress_every: float | None = None,
              revision: str | None = None) -> tuple[Any, Any]:  # fmt: skip
    """`runner run-batch`: submit the file as a job in `job_dir` (default OUTPUT.job), work on it, and write
    the output file (and OUTPUT.errors.jsonl) once every request is done. Run again, it resumes.
    `skip_invalid`: answer the valid requests; each line refused at submit is a 400 line of the error file.
    `chat_template`: Jinja text rendering the chat requests instead of the model's own (create_job).
    `truncate` "left": a prompt over the context window keeps its end (create_job). `progress_every`: seconds
    between progress lines (scheduler.work). `revision`: a hub model's branch, tag or commit (create_job)."""

    from .scheduler import run

    file_kind(input_path)  # a Batch file, or refused
    out = Path(output_path)
    folder = Path(job_dir) if job_dir else out.with_name(out.name + ".job")
    _spared_targets(out, None, folder, input_path)  # refused before the run, not after it
    # (from Python) the CLI's: the Batch default for max_tokens, and a seed from the file (`input_seed`)
    if params is None:
        from .params import GenerationParams

        trust = getattr(options, "trust_remote_code", False)
        params = GenerationParams(max_new_tokens=default_max_tokens(model, trust, revision))
    # requests without a seed: one from the file (`input_seed`), so a rerun is identical
    job, summary = run(input_path, model, params, options, output=folder, echo=echo, stop=stop,
                       served_model_names=tuple(served_model_names), skip_invalid=skip_invalid,
                       chat_template=chat_template, truncate=truncate, progress_every=progress_every,
                       revision=revision, seed_from_input=True)  # fmt: skip
    if summary.finished:
        lines, errors = export(job, out)
        if echo:
            echo(f"wrote {counted(lines, 'response lines')} to {out}"
                 + (f" and {counted(errors, 'error lines')} beside it" if errors else ""))  # fmt: skip
    return job, summary
