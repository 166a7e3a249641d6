"""Ray Data: generation, scoring and embedding as `Dataset.map_batches` stages, for jobs bigger than one machine
(the optional extra `runner[ray]`; `import runner` never imports ray).

ray.data.read_*(...) -> `Generate` / `Score` / `Embed` in an actor per GPU (the model loads once per actor) ->
write_parquet(...). Each batch (a pyarrow Table) goes through what a local job does to its rows:
inputs.RowChecker (the checks of submit) -> jobs._Preparer (chat template, tokens, context window) ->
tasks.make_task + tasks.isolating (the engine, OOM / NaN splitting) -> results tables (the shard columns).

The output has the columns of a local job's results (`runner.load_results`), then `error`, then the
passthrough columns: a row that cannot be done (invalid, or out of memory / NaN alone) is an output row with
its id, its sample (runtime errors), its passthrough columns and the reason in `error`, never a failed task.
Seeds are per (row id, sample) as in a local job (`tasks.sample_seed(seed, id, sample)`, seed 0 when
`params.seed` is None), so the results equal `runner run` of the same rows with the same seed, whatever the
batches and actors.

Differences from a file, because a stage sees one batch and never the whole dataset:
* every row needs its own id (a file's line number is not known here), and ids are only checked for
  duplicates within a batch;
* a null field is an absent field (an Arrow column has no "absent");
* the optional columns are decided up front: `settings` (null for rows without their own) always, for
  generation; `top_logprobs` / `prompt_logprobs` when the params ask for them or `outputs` names them. A row
  asking for one that is off is an error row, never dropped silently.

Resuming after a cluster job dies is Ray Data's own checkpointing keyed on the id column (README, "Bigger than
one machine"): the ids already written are filtered out at read, so finished rows are not computed again, and a
hub model's commit is kept beside the checkpoint (`_Pins`), so the rows left come from the same weights; a
model folder's (or .gguf file's) fingerprint is kept there too, and a restart on other files is refused.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ParamError, Problem, RunnerError
from .jobdir import WHOLE_LAST_WINDOW
from .params import ROW_SAMPLING, EmbedParams, EngineOptions, GenerationParams, ScoreParams

NAME = "ray batch"  # what a Problem says the row came from
PARAMS = {"generate": GenerationParams, "score": ScoreParams, "embed": EmbedParams}
# Optional result columns of generation: `constraint` is the constraint_complete column of structured output.
OPTIONAL_OUTPUTS = ("top_logprobs", "prompt_logprobs", "constraint", "beam_score")


@dataclass
class _JobView:
    """What tasks.make_task reads of a Job: a stage is a job without a folder."""

    kind: str
    params: Any
    seed: int
    options: EngineOptions
    meta: dict[str, Any] = field(default_factory=dict)


def actor_device(options: EngineOptions) -> EngineOptions:
    """The options with the device Ray gave this actor: `cuda` (Ray sets CUDA_VISIBLE_DEVICES to its GPUs) when
    it was assigned GPUs, else `cpu`. Outside a Ray worker, or with a device map, the options as given."""
    try:
        import ray
    except ImportError:  # a stage called directly, without Ray
        return options
    if options.device_map is not None or not ray.is_initialized():
        return options
    return replace(options, device="cuda" if ray.get_gpu_ids() else "cpu")


class _Stage:
    """A `map_batches` callable class: loads the model once (per actor), then turns each batch of input rows
    into result rows. Subclasses fix the job kind."""

    kind = ""

    def __init__(
        self,
        model: str,
        params: Any = None,
        options: EngineOptions | None = None,
        *,
        prompt_field: str | None = None,
        template: str | None = None,
        truncate: str = "none",
        chat: bool = False,
        id_field: str = "id",
        outputs: Iterable[str] = (),
        revision: str | None = None,
        fingerprint: str | None = None,
    ):
        from .engine import Engine
        from .inputs import RowChecker
        from .jobs import _Preparer, _sample_auto
        from .models import asked_revision

        self.params, self.outputs = _check(self.kind, params, truncate, chat, outputs)
        self.prompt_field = prompt_field or ("prompt" if self.kind == "generate" else "text")
        self.id_field, self.template = id_field, template
        generate = self.kind == "generate"
        self.checker = RowChecker(
            NAME, self.prompt_field, template, id_field,
            messages_field="messages" if generate else None,
            pair_fields=("context", "continuation") if self.kind == "score" else None,
            row_settings=generate, chat=chat,
        )  # fmt: skip
        self.checker.settings_from_arrow = True  # rows come in as Arrow batches (null-filled struct keys)
        # (`apply` gives every actor the commit it pinned: actors started after an update load what the first did)
        self.engine = Engine(model, actor_device(options or EngineOptions()), asked_revision(model, revision))
        # (`apply` gives every actor the fingerprint of the files it pinned: actors started after a fine-tune was
        # saved over the folder refuse to load what the first did not)
        _loaded_pinned(self.engine, fingerprint)
        auto = generate and _sample_auto(self.params)
        seed = getattr(self.params, "seed", None)
        meta = {
            "sample_auto": auto,
            "row_sampling": ROW_SAMPLING,
            "outputs": {**self.outputs, "settings": generate},
            WHOLE_LAST_WINDOW: True,  # (long texts scored as a job of now scores them)
        }
        self.job = _JobView(self.kind, self.params, 0 if seed is None else seed, self.engine.options, meta)
        self.prep = _Preparer(self.kind, self.engine.tokenizer, self.params, self.engine.context_window,
                              truncate, self.prompt_field, auto)  # fmt: skip

    def __call__(self, batch: Any) -> Any:
        """Result rows of a batch of input rows (a pyarrow Table; pandas and dicts of arrays are taken too), in
        input order: a row's samples, or its error row. In a Ray actor, as tables of one id each (`_by_id`)."""
        out = self.results(batch)
        return _by_id(out) if _in_ray_actor() else out

    def results(self, batch: Any) -> Any:
        """The result rows of `batch` (as `__call__` says), as one table."""
        import pyarrow as pa
        import pyarrow.compute as pc

        batch = _as_table(batch)
        rows, problems = self._check(batch)
        prepared, more = self.prep.prepare(NAME, rows)
        prepared, refused = self._asks_known_outputs(prepared)
        problems += more + refused
        prompts = self._prompts_table(batch, prepared)
        done, failed = self._compute(prompts)
        schema = self._schema(batch.schema)
        tables = []
        if done:
            table = self._task.table(prompts, done, self.engine.texts)
            at = len(self._kind_schema())
            tables.append(table.add_column(at, "error", pa.nulls(table.num_rows, pa.string())))
        ids = prompts.column("id").to_pylist()
        positions = prompts.column("_row").to_pylist()
        errors = [(p.line - 1, None, p.id if p.id is not None else _raw_id(batch, p.line - 1, self.id_field),
                   f"{p.field}: {p.message}" if p.field else p.message) for p in problems]  # fmt: skip
        errors += [(positions[r], s, ids[r], f"{e.error}: {e.message}") for r, s, e in failed]
        if errors:
            tables.append(self._error_table(batch, schema, errors))
        if not tables:
            return schema.empty_table().drop(["_row"])
        out = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
        out = out.take(pc.sort_indices(out, [("_row", "ascending"), ("sample", "ascending")]))
        return out.drop(["_row"])

    # --- a batch, step by step ------------------------------------------------------------------------------

    def _check(self, batch: Any) -> tuple[list[Any], list[Problem]]:
        """The valid rows (numbered by their position + 1, as `line`) and the problems of the others: the
        checks of submit, plus an id on every row and no id twice in the batch."""
        from .inputs import PromptRow

        rows: list[PromptRow] = []
        problems: list[Problem] = []
        first: dict[str, int] = {}
        for i, obj in enumerate(batch.to_pylist()):
            obj = {k: v for k, v in obj.items() if v is not None}  # a null is an absent field
            request = self._batch_request(i + 1, obj)
            if request is not None or obj.get(self.id_field) is None:
                missing = (
                    "missing: rows on Ray Data need their own id (results and checkpoints are keyed on it)"
                )
                problems.append(request or Problem(NAME, i + 1, self.id_field, missing))
                continue
            item = self.checker.check(i + 1, obj)
            if isinstance(item, Problem):
                problems.append(item)
            elif item.id in first:
                problems.append(Problem(NAME, i + 1, self.id_field,
                                        f"duplicate id {item.id!r} (first in row {first[item.id]} of this batch)",
                                        item.id))  # fmt: skip
            else:
                first[item.id] = i + 1
                rows.append(item)
        return rows, problems

    def _batch_request(self, line: int, obj: dict[str, Any]) -> Problem | None:
        """The problem of a row that is an OpenAI Batch request (an endpoint's url, a body object, no prompt or
        messages of its own), keyed by its custom_id: a stage reads plain rows, and such a row was an error row
        saying it had no id, or no prompt, when it has both in its body."""
        url = obj.get("url")
        fields = {self.prompt_field, "messages", "context", "continuation"}
        if fields & set(obj) or not isinstance(obj.get("body"), dict) or not str(url).startswith("/v1/"):
            return None
        cid = obj.get("custom_id")
        return Problem(NAME, line, "body", BATCH_REQUEST, cid if isinstance(cid, str) and cid else None)

    def _asks_known_outputs(self, prepared: list[Any]) -> tuple[list[Any], list[Problem]]:
        """Rows asking for an optional output column this stage does not have become problems."""
        from .jobs import asked_outputs

        if self.kind != "generate":
            return prepared, []
        keep, problems = [], []
        for item in prepared:
            row = item[0]
            p = self.prep.row_params(row)
            asked = [o for o, on in asked_outputs(p).items() if on and not self.outputs[o]]
            if asked:
                problems.append(Problem(NAME, row.line, _FIELD_OF[asked[0]],
                                        f"this row asks for {asked[0]}, a column this stage does not have: pass "
                                        f"outputs=({asked[0]!r},) (a stage fixes its columns before it sees rows)",
                                        row.id))  # fmt: skip
            else:
                keep.append(item)
        return keep, problems

    def _prompts_table(self, batch: Any, prepared: list[Any]) -> Any:
        """A job's prompts table (jobs.py) for the prepared rows, `_row` being their position in the batch, with
        the passthrough columns as the batch has them."""
        import pyarrow as pa

        table = self.prep.table(prepared, 0)
        positions = pa.array([row.line - 1 for row, *_ in prepared], pa.int64())
        table = table.set_column(table.schema.get_field_index("_row"), "_row", positions)
        for col, out in self._passthrough(batch.schema):
            table = table.append_column(
                pa.field(out, batch.schema.field(col).type), batch.column(col).take(positions)
            )
        return table

    def _compute(self, prompts: Any) -> tuple[list[Any], list[tuple[int, int, Any]]]:
        """Every (row, sample) of the prompts table through the engine, in planned batches as a worker runs
        them (tasks.isolating splits a batch on OOM / NaN): (GeneratedRows, [(row, sample, RowError)])."""
        from .batching import default_batch_size, default_batch_tokens, plan_batches
        from .engine import NumericalError
        from .results import GeneratedRow
        from .tasks import REFILL_BATCHES, Isolation, RowError, isolating, make_task

        self._task = task = make_task(self.job, self.engine, prompts)
        if prompts.num_rows == 0:
            return [], []
        n = prompts.column("n").to_pylist() if self.kind == "generate" else [1] * prompts.num_rows
        keys = [(r, s) for r in range(prompts.num_rows) for s in range(n[r])]
        lengths = prompts.column("prompt_tokens").to_pylist()
        options = self.engine.options
        budget = options.max_batch_tokens or default_batch_tokens(self.engine, self.kind)
        batches = plan_batches([lengths[r] for r, _ in keys], default_batch_size(self.engine, options.batch_size),
                               budget, task.new_tokens)  # fmt: skip
        per = REFILL_BATCHES if self.kind == "generate" and options.continuous_batching else 1

        def checked(ks: list[tuple[int, int]]) -> list[Any]:
            outcomes = list(task.compute(ks))
            bad = [i for i, out in enumerate(outcomes) if not task.finite(out)]  # no NaN is ever written
            if bad:
                raise NumericalError(bad)
            return outcomes

        done, failed, iso = [], [], Isolation()
        for at in range(0, len(batches), per):
            ks = [keys[i] for b in batches[at : at + per] for i in b]
            for (r, s), out in zip(ks, isolating(self.engine, checked, ks, iso), strict=True):
                if isinstance(out, RowError):
                    failed.append((r, s, out))
                else:
                    done.append(GeneratedRow(r, s, out))
        return done, failed

    def _error_table(
        self, batch: Any, schema: Any, errors: list[tuple[int, int | None, str | None, str]]
    ) -> Any:
        """One row per error: position, sample, id, reason and passthrough columns; the other columns null."""
        import pyarrow as pa

        positions = pa.array([e[0] for e in errors], pa.int64())
        cols = {"_row": positions, "sample": pa.array([e[1] for e in errors], pa.int32()),
                "id": pa.array([e[2] for e in errors], pa.string()),
                "error": pa.array([e[3] for e in errors], pa.string())}  # fmt: skip
        for col, out in self._passthrough(batch.schema):
            cols[out] = batch.column(col).take(positions)
        return pa.table([cols[f.name] if f.name in cols else pa.nulls(len(errors), f.type) for f in schema],
                        schema=schema)  # fmt: skip

    # --- columns ----------------------------------------------------------------------------------------------

    def _kind_schema(self) -> Any:
        from .results import embed_schema, generation_schema, score_schema

        if self.kind == "generate":
            o = self.outputs
            return generation_schema(o["top_logprobs"], o["prompt_logprobs"], settings=True,
                                     constraint=o["constraint"], beam_score=o["beam_score"])  # fmt: skip
        if self.kind == "score":
            return score_schema()
        from .jobs import embedding_dim

        return embed_schema(int(embedding_dim(self.engine.model.config) or 0))

    def _schema(self, input_schema: Any) -> Any:
        """The output schema for a batch of `input_schema` (with `_row`, dropped at the end)."""
        import pyarrow as pa

        schema = self._kind_schema().append(pa.field("error", pa.string()))
        for col, out in self._passthrough(input_schema):
            schema = schema.append(pa.field(out, input_schema.field(col).type))
        return schema

    def _passthrough(self, input_schema: Any) -> list[tuple[str, str]]:
        """(input column, its name in the results) of the columns passed through unchanged: all but the ones
        the rows are read from (id, prompt or text, messages, context + continuation, setting fields)."""
        from .params import ROW_SETTINGS
        from .passthrough import output_name
        from .results import PROMPT_COLUMNS

        used = {self.id_field}
        if self.template is None:
            used |= {self.prompt_field, "messages"} if self.kind == "generate" else {self.prompt_field}
        if self.kind == "score":
            used |= {"context", "continuation"}
        if self.kind == "generate":
            used |= set(ROW_SETTINGS)
        out: dict[str, str] = {}
        for col in input_schema.names:
            if col not in used:
                out[col] = output_name(col, self.kind, (*PROMPT_COLUMNS, "error"), out.values())
        return list(out.items())


def _loaded_pinned(engine: Any, fingerprint: str | None) -> None:
    """Refuse an actor whose model (a folder, a .gguf file, the demo) is not the one `apply` pinned when the
    pipeline was built (`fingerprint`, job.json's; None: a stage made without `apply`, or a hub model, whose
    commit is pinned instead): an actor started later (autoscaled, or restarted after a crash) loaded the folder
    as it is then, so a fine-tune saved over it mid-run made its rows the new weights' and the others' the old,
    without a word. Checked after loading, as a job's worker checks (`jobs.model_unchanged`): files changed
    while it loaded differ here too. Sampled, never whole weight files; a fingerprint that differs is computed
    once more, from no kept GGUF table (a torn read of a network mount), before the model is taken for another.
    The actor raising, Ray Data replaces it and fails the run once replacements fail as well: the rows so far
    stay the pinned model's, and none of the new one's is written."""
    from .models import has_fingerprint, reading_model

    trusted = engine.options.trust_remote_code
    if fingerprint is None or reading_model(
        lambda: has_fingerprint(engine.spec, fingerprint, trusted, engine.revision), engine.spec
    ):
        return
    raise RunnerError(f"the model {engine.spec!r} is not the one this pipeline was started with: its weights, "
                      "config or tokenizer files changed since it was built (a fine-tune saved over it?), and "
                      "this actor, started later, would compute its rows from other weights than the rows so "
                      "far. To finish the pipeline, put back the model's files as they were; or run it again to "
                      "start over on the model as it is now (with a checkpoint, give another checkpoint "
                      "path)")  # fmt: skip


class Generate(_Stage):
    """`ds.map_batches(Generate, fn_constructor_args=(model, GenerationParams(...)), batch_format="pyarrow",
    concurrency=N, num_gpus=1)`: one result row per (prompt, sample), as `runner run`."""

    kind = "generate"


class Score(_Stage):
    """`ds.map_batches(Score, fn_constructor_args=(model, ScoreParams(...)), ...)`: as `runner score`."""

    kind = "score"


class Embed(_Stage):
    """`ds.map_batches(Embed, fn_constructor_args=(model, EmbedParams(...)), ...)`: as `runner embed`."""

    kind = "embed"


def _check(
    kind: str, params: Any, truncate: str, chat: bool, outputs: Iterable[str]
) -> tuple[Any, dict[str, bool]]:
    """The stage's params (the kind's defaults when None) and which optional columns it has, every argument
    checked as submit checks it."""
    from .jobs import _check_args, asked_outputs

    params = PARAMS[kind]() if params is None else params
    if not isinstance(params, PARAMS[kind]):
        raise TypeError(f"a {kind} stage takes {PARAMS[kind].__name__}, not {type(params).__name__}")
    _check_args(params, truncate, None, None, 0, chat)
    outputs = list(outputs)
    for name in outputs:
        if name not in OPTIONAL_OUTPUTS or kind != "generate":
            raise ParamError("outputs", f"outputs must name {' or '.join(OPTIONAL_OUTPUTS)} (generation only), "
                                        f"got {name!r}.")  # fmt: skip
    on = asked_outputs(params) if kind == "generate" else dict.fromkeys(OPTIONAL_OUTPUTS, False)
    return params, {o: on[o] or o in outputs for o in OPTIONAL_OUTPUTS}


BATCH_REQUEST = (
    "an OpenAI Batch request (custom_id, method, url, body): a Ray stage reads plain rows (an id, the prompt or "
    "messages, settings as fields); run a Batch file with `runner run-batch` or `runner submit`, or turn each "
    "request's body into such a row first"
)

_FIELD_OF = {"top_logprobs": "logprobs", "prompt_logprobs": "prompt_logprobs", "constraint": "response_format",
             "beam_score": "num_beams"}  # fmt: skip


def _in_ray_actor() -> bool:
    """Whether this runs in a Ray actor (a stage of Ray Data's actor pool), not called directly."""
    ray = sys.modules.get("ray")  # (a stage called outside Ray never imports it)
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _by_id(table: Any) -> Any:
    """`table`'s rows, a table per id (its samples, or its error row), for Ray Data: it joins them into blocks and
    cuts a block only where it is 1.5 times its `target_max_block_size`, so one id's rows under half that are
    never cut apart. Cut, an id's samples were written in two blocks, checkpointed one by one: a run stopped
    between the two, the id was in the checkpoint and its restart skipped the row, losing the samples of the
    block not written. With a checkpoint, rows of one id too big to stay whole are refused, saying so."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    most = ctx.target_max_block_size if ctx.checkpoint_config is not None else None
    ids = table.column("id").to_pylist()
    if not ids:
        yield table
    start = 0
    for end in range(1, len(ids) + 1):
        if end < len(ids) and ids[end] is not None and ids[end] == ids[start]:
            continue
        rows = table.slice(start, end - start)
        if most is not None and rows.nbytes * 2 >= most:
            raise RunnerError(f"the {rows.num_rows} result rows of id {ids[start]!r} take {rows.nbytes} bytes, "
                              f"half or more of Ray Data's target_max_block_size ({most}), so Ray would cut them "
                              "into two blocks, written and checkpointed apart (a run stopped between the two "
                              "resumes without the second's): raise ray.data.DataContext.get_current()."
                              "target_max_block_size above twice that before building the pipeline")  # fmt: skip
        yield rows
        start = end


def _as_table(batch: Any) -> Any:
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch
    if hasattr(batch, "to_pandas") or type(batch).__module__.startswith("pandas"):
        return pa.Table.from_pandas(batch, preserve_index=False)
    return pa.table({k: list(v) for k, v in batch.items()})


def _raw_id(batch: Any, position: int, id_field: str) -> str | None:
    """The id of an invalid row as its own column gives it (as text), so that its error row keeps it."""
    if id_field not in batch.column_names:
        return None
    value = batch.column(id_field)[position].as_py()
    return None if value is None else str(value)


# --- the one-call helpers ---------------------------------------------------------------------------------


def generate(ds: Any, model: str, params: GenerationParams | None = None, options: EngineOptions | None = None,
             **kwargs: Any) -> Any:  # fmt: skip
    """`ds` (a ray.data.Dataset of prompt rows) -> a Dataset of result rows, as `runner run` writes them, plus
    `error`. Keyword arguments: those of `apply` below, and of the stage (`prompt_field`, `template`, `chat`,
    `truncate`, `id_field`, `outputs`)."""
    return apply(Generate, ds, model, params, options, **kwargs)


def score(ds: Any, model: str, params: ScoreParams | None = None, options: EngineOptions | None = None,
          **kwargs: Any) -> Any:  # fmt: skip
    """`ds` -> a Dataset of scores, as `runner score` writes them, plus `error`."""
    return apply(Score, ds, model, params, options, **kwargs)


def embed(ds: Any, model: str, params: EmbedParams | None = None, options: EngineOptions | None = None,
          **kwargs: Any) -> Any:  # fmt: skip
    """`ds` -> a Dataset of vectors, as `runner embed` writes them, plus `error`."""
    return apply(Embed, ds, model, params, options, **kwargs)


def apply(
    stage: type[_Stage],
    ds: Any,
    model: str,
    params: Any = None,
    options: EngineOptions | None = None,
    *,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
    batch_size: int = 64,
    map_kwargs: dict[str, Any] | None = None,
    **stage_kwargs: Any,
) -> Any:
    """`ds.map_batches(stage, ...)` with `concurrency` actors (an int, or (min, max) to autoscale), each with
    `num_gpus` GPUs (1: one model per GPU; 0: CPU) and `num_cpus` CPUs, `batch_size` rows per call. Everything
    that can be checked without the weights is checked here first (settings, the model's config and tokenizer,
    max_new_tokens against the context window), so a mistake is an error now, not in every actor later.
    A hub model is pinned here to one commit (of `revision`, a branch, tag or commit, else of main) that every
    actor loads, as a job is; with a checkpoint (`checkpoint_config`, set before `ds` was made), to the commit
    the checkpoint was started on (`_pin`), and a model folder's changing since is refused, as are other
    settings or another model than the checkpoint's (`_same_settings`). `map_kwargs` go to
    `map_batches` as they are."""
    from .inputs import Template
    from .models import asked_revision

    params, _ = _check(stage.kind, params, stage_kwargs.get("truncate", "none"), stage_kwargs.get("chat", False),
                       stage_kwargs.get("outputs", ()))  # fmt: skip
    if stage_kwargs.get("template") is not None:
        Template(stage_kwargs["template"])
    asked = asked_revision(model, stage_kwargs.pop("revision", None))
    _same_settings(ds, _settings(stage.kind, model, params, stage_kwargs))
    stage_kwargs["revision"], stage_kwargs["fingerprint"] = _pin(
        ds, model, options or EngineOptions(), stage.kind, params, asked
    )
    extra = dict(map_kwargs or {})
    if num_cpus is not None:
        extra["num_cpus"] = num_cpus
    if "compute" not in extra:  # an ActorPoolStrategy in map_kwargs sizes the pool itself
        from ray.data import ActorPoolStrategy

        low, high = (concurrency, concurrency) if isinstance(concurrency, int) else concurrency
        extra["compute"] = ActorPoolStrategy(min_size=low, max_size=high)
    return ds.map_batches(
        stage, fn_constructor_args=(model, params, options), fn_constructor_kwargs=stage_kwargs,
        batch_format="pyarrow", batch_size=batch_size, num_gpus=num_gpus, **extra,
    )  # fmt: skip


def _pin(
    ds: Any, model: str, options: EngineOptions, kind: str, params: Any, asked: str | None
) -> tuple[str | None, str | None]:
    """(commit, fingerprint) every actor loads and checks. The commit of hub model `model` (None for a folder,
    a .gguf file or the demo): that of `asked`, else the newest; where `ds` is checkpointed, the one this
    stage's checkpoint was started on, kept beside it (`_Pins`), so that a pipeline run again after an update
    of the model continues on the commit its rows so far came from (it pinned the new one: rows before and
    after the restart from two models, without a word). A `revision` naming another commit than the
    checkpoint's is refused, naming both. A model here has no commit: its fingerprint (job.json's) is pinned
    instead (None for a hub model), the checkpoint's, kept there, and a restart on other files is refused
    (`_same_files`); each actor checks the files it loaded against it (`_loaded_pinned`)."""
    from .jobs import _pinned_facts
    from .models import is_hub_model

    pins = _Pins.of(ds)
    key = _stage_key(ds, model) if pins is not None else model
    hub = is_hub_model(model)
    earlier = pins.commits.get(key) if pins is not None and hub else None
    if earlier and asked:
        _same_commit(pins, key, model, asked, earlier)
    pinned, _ = _pinned_facts(model, options, kind, params, None, earlier or asked)
    commit = pinned.get("model_revision")
    fingerprint = None if hub else pinned["model_fingerprint"]
    if pins is None:
        return commit, fingerprint
    if not hub:
        fingerprint = _same_files(pins, key, model, options, fingerprint)
    elif commit and not earlier:
        pins.add("commits", key, commit)
    return commit, fingerprint


def _settings(kind: str, model: str, params: Any, stage_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a stage computes its rows with, as a job's identity has it (jobs._identity): the model, the kind,
    the settings (a seed of None as the 0 it computes with) and how rows are read; not where or how fast (actors,
    GPUs, batch sizes, the commit: `_pin` keeps that)."""
    from .params import OFF_UNSAID

    said = {**OFF_UNSAID, **params.to_dict()}
    if kind == "generate" and said.get("seed") is None:
        said["seed"] = 0
    _, outputs = _check(kind, params, stage_kwargs.get("truncate", "none"), stage_kwargs.get("chat", False),
                        stage_kwargs.get("outputs", ()))  # fmt: skip
    return {
        "model": model, "kind": kind, **said,
        "prompt_field": stage_kwargs.get("prompt_field") or ("prompt" if kind == "generate" else "text"),
        "template": stage_kwargs.get("template"), "truncate": stage_kwargs.get("truncate", "none"),
        "chat": bool(stage_kwargs.get("chat", False)), "id_field": stage_kwargs.get("id_field", "id"),
        "outputs": sorted(o for o, on in outputs.items() if on),
    }  # fmt: skip


def _same_settings(ds: Any, settings: dict[str, Any]) -> None:
    """Keep the settings of this stage (`_settings`) beside `ds`'s checkpoint, under its place in the pipeline
    (the n-th stage of runner); or refuse a restart with others: a script run again with a setting edited (a
    seed, max_new_tokens, a template) or another model computed the rows left with those, and the output
    mixed them with the rows so far, without a word (a job resumed with other settings is refused too)."""
    pins = _Pins.of(ds)
    if pins is None:
        return
    key = str(len(_upstream_stages(ds)) + 1)
    earlier = pins.stages.get(key)
    if earlier is None:
        pins.add("stages", key, settings)
        return
    from .jobs import settings_apart

    differs = settings_apart(earlier, settings)
    if differs:
        where = "the checkpoint" if key == "1" else f"its stage {key} (of runner) in the checkpoint"
        raise RunnerError(f"{where} at {pins.where} was started with other settings ({'; '.join(differs)}), and "
                          f"its rows so far were computed with them (kept in {pins.shown}): to finish it, run the "
                          "pipeline with those; or give another checkpoint path to start over")  # fmt: skip


def _upstream_stages(ds: Any) -> list[tuple[Any, tuple[Any, ...]]]:
    """(stage class, constructor args) of every stage of runner upstream of `ds` in its logical plan (Ray's:
    operators with `fn`, `fn_constructor_args`, `input_dependencies`); none where it cannot be read."""
    found, seen = [], set()
    ops = [getattr(getattr(ds, "_logical_plan", None), "dag", None)]
    while ops:
        op = ops.pop()
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        fn, args = getattr(op, "fn", None), tuple(getattr(op, "fn_constructor_args", None) or ())
        if isinstance(fn, type) and issubclass(fn, _Stage):
            found.append((fn, args))
        ops.extend(getattr(op, "input_dependencies", None) or ())
    return found


def _stage_key(ds: Any, model: str) -> str:
    """What this stage's pins are kept under: `model`, or for the n-th stage of `model` in one pipeline
    "`model`#n" (n from 2), n counted from the stages of runner of that model upstream of it in `ds`'s logical
    plan (Ray's: operators with `fn`, `fn_constructor_args`, `input_dependencies`). Kept by model alone, two
    stages of one model at two commits (generate at one, score at another) were refused on their first run:
    the second found the first's. A plan that cannot be read counts none (two such stages are refused)."""
    found = sum(1 for _, args in _upstream_stages(ds) if args[:1] == (model,))
    return model if not found else f"{model}#{found + 1}"


def _stage_named(key: str, model: str) -> str:
    """How a refusal names the stage kept under `key`: the checkpoint, or its n-th stage of `model` in it."""
    return (
        "the checkpoint"
        if key == model
        else f"its stage {key.rsplit('#', 1)[1]} of {model!r} in the checkpoint"
    )


def _same_commit(pins: _Pins, key: str, model: str, asked: str, earlier: str) -> None:
    """Refuse `asked`, a revision of hub model `model` naming another commit than `earlier`, the one the
    checkpoint's stage (`key`) was started on."""
    from .models import hub_snapshot

    now = hub_snapshot(model, asked)
    if now != earlier:
        raise ParamError("revision", f"revision={asked!r} names {model!r} at {now}, but "
                         f"{_stage_named(key, model)} at {pins.where} was started on {earlier} (its rows so far "
                         f"are of that commit: {pins.shown}): pass revision={earlier!r}, or none, to finish it on "
                         "that commit, or give another checkpoint path to start over")  # fmt: skip


def _same_files(pins: _Pins, key: str, model: str, options: EngineOptions, now: str) -> str:
    """Keep `now`, the fingerprint of model `model` (a folder, a .gguf file, the demo) as job.json's (sampled
    weights, config, tokenizer files: never whole weight files), for the checkpoint's stage `key`; or refuse a
    restart on other files than its first run's: a fine-tune saved over the folder (a Colab notebook saving to
    the same Drive folder) made the rows left the new weights' and those before the old's, without a word. As a
    job's (`models.has_fingerprint`), a fingerprint kept by an earlier runner is computed again its way (its
    version), and one that differs once more (a torn read of a network mount) before the files are taken for
    others. The fingerprint kept: what the stage's actors check theirs against."""
    from .models import has_fingerprint

    earlier = pins.fingerprints.get(key)
    if earlier is None:
        pins.add("fingerprints", key, now)
        return now
    if now == earlier or has_fingerprint(model, earlier, options.trust_remote_code):
        return earlier
    raise RunnerError(f"the model {model!r} is not the one {_stage_named(key, model)} at {pins.where} was "
                      "started with: its weights, config or tokenizer files changed since (a fine-tune saved over "
                      f"it?), and the rows so far came from them as they were (their fingerprint is kept in "
                      f"{pins.shown}). To finish it, put back the model's files as they were; or give another "
                      "checkpoint path to start over on the model as it is now")  # fmt: skip


class _Pins:
    """What each stage of a checkpointed pipeline was pinned to when its checkpoint started:
    `_runner/pins.json` under the checkpoint path, {"commits": {stage: commit} of hub models, "fingerprints":
    {stage: fingerprint} of the others, "stages": {n: settings} of the n-th stage, "check": its checksum}, a
    stage keyed as `_stage_key` says (a file written before fingerprints or settings were kept has none: they
    are kept from the next run). Ray's look at its
    checkpoint lists the files at the top and reads Parquet, skipping names that start with "_"; it deletes the
    whole folder once the run succeeds, so the next run pins anew."""

    NAME = "_runner/pins.json"

    def __init__(self, config: Any):
        import pyarrow.fs as pafs
        from ray.data.datasource.path_util import _unwrap_protocol

        self.where, self.fs = config.checkpoint_path, config.filesystem
        self.path = f"{_unwrap_protocol(self.where).rstrip('/')}/{self.NAME}"
        self.shown = f"{self.where.rstrip('/')}/{self.NAME}"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        record = self._read()
        self.commits: dict[str, str] = record.get("commits", {})
        self.fingerprints: dict[str, str] = record.get("fingerprints", {})
        self.stages: dict[str, dict[str, Any]] = record.get("stages", {})

    @classmethod
    def of(cls, ds: Any) -> _Pins | None:
        """The pins of `ds`'s checkpoint (Ray checkpoints a dataset by the DataContext it was made in), None
        where it has none."""
        config = getattr(getattr(ds, "context", None), "checkpoint_config", None)
        return cls(config) if getattr(config, "checkpoint_path", None) else None

    def _read(self) -> dict[str, Any]:
        import pyarrow.fs as pafs

        from .storage import fails_its_check, json_of_bytes, read_bytes

        if self.local:
            data = read_bytes(self.path) if os.path.lexists(self.path) else None
        elif self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            with self.fs.open_input_stream(self.path) as f:
                data = f.read()
        else:
            data = None
        if data is None:
            return {}
        try:
            record = json_of_bytes(data)
            kept = (
                [record.get(k, {}) for k in ("commits", "fingerprints", "stages")]
                if isinstance(record, dict)
                else [0]
            )
            if not all(isinstance(k, dict) for k in kept) or "commits" not in record or "check" not in record:
                raise ValueError("not a record of commits")
            if fails_its_check(record):
                raise ValueError("its checksum does not match")
        except ValueError as e:
            raise RunnerError(f"{self.shown} is damaged ({e}): it says which commit of each hub model, "
                              "which files of each other model and which settings the checkpoint's rows so far "
                              "came from. Delete it and pass revision=COMMIT (that commit) to a hub model's "
                              "stage, or give another checkpoint path to start over") from None  # fmt: skip
        return record

    def add(self, field: str, key: str, value: Any) -> None:
        """Keep `value` (one of "commits", "fingerprints" or "stages", `field`) for stage `key`, written whole or
        not at all (a temp file renamed; an object store's put)."""
        from .storage import json_checksum, retry, write_json

        getattr(self, field)[key] = value
        record: dict[str, Any] = {
            "commits": self.commits,
            "fingerprints": self.fingerprints,
            "stages": self.stages,
        }
        record["check"] = json_checksum(record)
        if self.local:
            folder = os.path.dirname(self.path)
            retry(lambda: os.makedirs(folder, exist_ok=True), f"create {folder}")
            write_json(self.path, record)
            return
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(record, indent=2).encode())


def checkpoint_config(path: str, id_field: str = "id", **kwargs: Any) -> Any:
    """Ray Data's own checkpointing keyed on the row ids, to set before the pipeline runs:
    `ray.data.DataContext.get_current().checkpoint_config = runner.ray.checkpoint_config("/mnt/shared/ckpt")`.
    A read_* -> generate -> write_* pipeline then writes the ids of each block it writes under `path` (a
    folder every node sees, or s3://...) and, run again after it died, reads only rows whose id is not there.
    `id_field` is the input column the stage reads ids from (its own `id_field`); the results always hold them
    as `id`. Integer ids are matched as the text the results give them; a row without id is an error row each
    run."""
    from ray.data.checkpoint import CheckpointConfig

    if "id_column" in kwargs:
        raise ParamError("id_column", f"runner.ray.checkpoint_config takes id_field={kwargs['id_column']!r} "
                         "(the input column, as the stage's id_field); the results always name it `id`")  # fmt: skip
    filter_cls, manager_cls = _checkpoint_classes(id_field)
    kwargs.setdefault("checkpoint_filter_cls", filter_cls)
    kwargs.setdefault("checkpoint_manager_cls", manager_cls)
    return CheckpointConfig(id_column="id", checkpoint_path=path, **kwargs)


def _checkpoint_classes(id_field: str) -> tuple[type, type]:
    """Ray's checkpoint filter and manager, for ids as a stage writes them. Ray keys both sides on one column;
    the results name it `id` whatever input column the ids came from, so the filter reads `id_field` of the
    input (with one name, an `id_field="key"` pipeline failed in every write: no `key` in the results). The
    filter compares each input id as its text (`str(id)`; Ray compared an integer id column with the text ids
    written: a TypeError, so a run with integer ids could never resume), and neither side holds a null id (a
    row without id, an error row each run: Ray's sort of the ids written failed on its null, stopping every
    run after the first)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from ray.data.checkpoint.checkpoint_filter import (
        IdColumnCheckpointManager,
        NumpyArrayBasedCheckpointFilter,
    )

    class TextIdFilter(NumpyArrayBasedCheckpointFilter):
        def filter_rows_for_block(self, block: Any) -> Any:
            ids = block[id_field].to_pylist() if id_field in block.column_names else [None] * block.num_rows
            known = [i for i, v in enumerate(ids) if v is not None]
            rows = pa.table({self.id_column: pa.array([str(ids[i]) for i in known], pa.string()),
                             "row": pa.array(known, pa.int64())})  # fmt: skip
            kept = set(super().filter_rows_for_block(rows).column("row").to_pylist())
            return block.take(pa.array([i for i, v in enumerate(ids) if v is None or i in kept], pa.int64()))

    class IdsWritten(IdColumnCheckpointManager):
        def _preprocess_data_pipeline(self, checkpoint_ds: Any) -> Any:
            col = self.id_column
            return checkpoint_ds.map_batches(lambda t: t.filter(pc.is_valid(t[col])), batch_format="pyarrow")

    return TextIdFilter, IdsWritten
