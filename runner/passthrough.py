"""Passthrough columns: the input columns a job carries to its results unchanged, and their Arrow types.

jobs.py (submit, a chunk at a time) -> `Passthrough.register` / `arrays` / `written_arrays` -> prompts.parquet;
`rewrite_passthrough` when a column's type changed after the first chunk was written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import storage
from .errors import RunnerError
from .inputs import PromptReader, PromptRow
from .results import output_columns


def output_name(column: str, kind: str, fixed: Iterable[str], taken: Iterable[str]) -> str:
    """The name of an input column in the results: an input column named like an output column of the job
    `kind` (say `text`), like one of the `fixed` columns or like a passthrough column already `taken` keeps
    its data as `input_text` (`input_input_text` ...)."""
    avoid = set(output_columns(kind)) | set(fixed) | set(taken)
    out = column
    while out in avoid:
        out = f"input_{out}"
    return out


class Passthrough:
    """The passthrough columns: their names in the results, and their Arrow types, decided across chunks as
    one `pa.array` call over the whole column decides them: ints and floats make floats, nulls go with
    anything, structs merge their fields; a column whose values share no type is JSON text in every row.

    prompts.parquet is opened with the types of the first chunk. A later chunk that needs another type or
    brings a new column cannot change the row groups already written: from then on the passthrough columns
    are written as nulls and `rewrite` is set, and `rewrite_passthrough` fills them in at the end, reading
    the values from the input again. A file whose columns keep their types (the usual case) is written once."""

    def __init__(self, kind: str, fixed: tuple[str, ...], declared: dict[str, Any] | None = None):
        """`declared`: the Arrow type a Parquet input gives each column (`PromptReader.column_types`), kept
        where its values take it: a float32 or int16 column stays one, not the float64 / int64 its Python
        values would make."""
        self.kind, self.fixed = kind, fixed
        self.declared = declared or {}
        self.types: dict[str, Any] = {}  # input name -> Arrow type so far (None: JSON text), first-seen order
        self.out: dict[str, str] = {}  # input name -> name in prompts.parquet and the results
        self.frozen: dict[str, Any] | None = None  # the types prompts.parquet was opened with
        self.rewrite = False

    def register(self, names: list[str]) -> None:
        import pyarrow as pa

        inputs = {*self.types, *names}  # a renamed column never takes another input column's name (`text`
        for (
            col
        ) in names:  # beside an `input_text` is `input_input_text`; the user's `input_text` keeps its name)
            if col in self.types:
                continue
            self.types[col] = pa.null()
            self.out[col] = output_name(col, self.kind, self.fixed, {*self.out.values(), *(inputs - {col})})

    def arrays(self, rows: list[PromptRow]) -> dict[str, Any]:
        """This chunk's column arrays, with the types updated by its values."""
        out = {}
        for col, typ in self.types.items():
            values = [r.extra.get(col) for r in rows]
            arr = None if typ is None else _declared_array(values, self.declared.get(col))
            if typ is not None and arr is None:
                arr = _infer_array(values)
            merged = _unify(typ, arr.type) if arr is not None else None
            typed = None
            if merged is not None and _storable(merged):
                typed = arr if arr.type == merged else _cast(arr, values, merged)
            if typed is None:
                self.types[col] = None
                out[col] = _json_array(values)
            else:
                self.types[col] = merged
                out[col] = typed
        return out

    def freeze(self) -> None:
        self.frozen = dict(self.types)

    def fields(self) -> list[Any]:
        import pyarrow as pa

        assert self.frozen is not None
        return [pa.field(self.out[c], t if t is not None else pa.string()) for c, t in self.frozen.items()]

    def written_arrays(self, arrays: dict[str, Any], n: int) -> list[Any]:
        """The arrays to write under the frozen types: this chunk's own while every column keeps its type,
        nulls once a type has changed (the rewrite fills them in)."""
        import pyarrow as pa

        self.rewrite = self.rewrite or self.types != self.frozen
        if self.rewrite:
            return [pa.nulls(n, f.type) for f in self.fields()]
        return [arrays[c] for c in self.frozen]  # type: ignore[union-attr]

    def json_columns(self) -> list[str]:
        return [self.out[c] for c, t in self.types.items() if t is None]

    def renamed(self) -> dict[str, str]:
        return {c: o for c, o in self.out.items() if c != o}


def _infer_array(values: list[Any]) -> Any:
    """`pa.array(values)`, or None when the values share no Arrow type. pandas' Timestamps and Timedeltas (a
    Parquet or DataFrame column in nanoseconds) keep their nanoseconds: pa.array makes microseconds of them,
    and two event times 1 ns apart came back equal (adversarial pass 21)."""
    import pyarrow as pa

    errors = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError)
    try:
        return pa.array(values, _nanoseconds(values))
    except errors:
        pass
    if all(v is None or (type(v) is int and v >= 0) for v in values):  # past 2**63: uint64 holds them
        try:
            return pa.array(values, pa.uint64())
        except errors:
            pass
    return None


def _declared_array(values: list[Any], declared: Any) -> Any:
    """`pa.array(values, declared)`, the column's type in a Parquet input (a dictionary column: its values'
    type, as before), or None when there is none or the values do not take it (inferred then)."""
    import pyarrow as pa

    if declared is not None and pa.types.is_dictionary(declared):
        declared = declared.value_type
    if declared is None or _has_map(declared):  # a map: as its values make it, as before (datasets has none)
        return None
    try:
        return pa.array(values, declared)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError):
        return None


def _has_map(typ: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_map(typ):
        return True
    if pa.types.is_struct(typ):
        return any(_has_map(typ.field(i).type) for i in range(typ.num_fields))
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return _has_map(typ.value_type)
    return False


def _nanoseconds(values: list[Any]) -> Any:
    """The nanosecond Arrow type of a column of pandas Timestamps (with their time zone) or Timedeltas, else
    None (pa.array infers the type)."""
    import pyarrow as pa

    first = next((v for v in values if v is not None), None)
    kind = type(first).__name__ if type(first).__module__.startswith("pandas") else None
    if kind == "Timestamp":
        return pa.timestamp("ns", tz=None if first.tz is None else str(first.tz))
    return pa.duration("ns") if kind == "Timedelta" else None


def _unify(a: Any, b: Any) -> Any:
    """The type both `a` and `b` values fit, as `pa.array` would infer it over both; None if there is none."""
    import pyarrow as pa

    if a == b:
        return a
    if {a, b} == {pa.int64(), pa.uint64()}:  # past 2**63 in a later chunk: uint64, as one read would make it
        return pa.uint64()
    try:
        both = [pa.schema([("c", a)]), pa.schema([("c", b)])]
        schema = pa.unify_schemas(both, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None
    return schema.field("c").type


def _cast(arr: Any, values: list[Any], typ: Any) -> Any:
    """`arr` as `typ` without changing a value, else None (the column becomes JSON text): integers past 2**53
    after a chunk of floats were rounded to equal floats (adversarial pass 21), where `pa.array` over the whole
    column refuses the mix."""
    import pyarrow as pa

    errors = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, TypeError, OverflowError)
    try:
        return arr.cast(typ)  # safe: an integer no float holds exactly is an error, not a rounding
    except errors:
        try:
            return pa.array(values, typ)
        except errors:
            return None


# Nested lists and structs deeper than this are kept as JSON text: Parquet readers refuse a schema nested a few
# dozen levels deep (pyarrow: "Parquet schema too deeply nested" from about 45 nested lists), and prompts.parquet
# must read back (pass 64: a 100-deep list in a column made submit call its own file damaged).
MAX_NESTING = 16


def _storable(typ: Any, depth: int = 0) -> bool:
    """Whether Parquet can hold the type and read it back: a struct of no fields (`{}` in every row so far) it
    cannot, nor anything nested deeper than MAX_NESTING."""
    import pyarrow as pa

    if depth > MAX_NESTING:
        return False
    if pa.types.is_struct(typ):
        fields = [typ.field(i).type for i in range(typ.num_fields)]
        return bool(fields) and all(_storable(t, depth + 1) for t in fields)
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return _storable(typ.value_type, depth + 1)
    return True


def _json_array(values: list[Any]) -> Any:
    import pyarrow as pa

    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())


class _Retype(Exception):
    """A passthrough column's values do not fit the type decided for it: make it JSON text and start over."""

    def __init__(self, column: str):
        self.column = column


def rewrite_passthrough(reader: PromptReader, path: Path, columns: Passthrough) -> None:
    """Rewrite prompts.parquet with every passthrough column in its final type, a row group at a time, taking
    the values from the input file again (read a second time, never held whole). Only files whose columns
    change type along the way get here."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(storage.arrow_file(path))
    fixed = [f for f in pf.schema_arrow if f.name not in columns.out.values()]
    out_path = path.with_name(f".{path.name}.rewrite")
    while True:  # more than once only if a column's values do not fit its unified type after all
        schema = pa.schema(fixed + [pa.field(columns.out[c], t if t is not None else pa.string())
                                    for c, t in columns.types.items()])  # fmt: skip
        valid = (r for r in reader.rows() if isinstance(r, PromptRow))
        try:
            with pq.ParquetWriter(storage.arrow_file(out_path, "wb"), schema, compression="zstd") as writer:
                for g in range(pf.num_row_groups):
                    table = pf.read_row_group(g, columns=[f.name for f in fixed])
                    extras = []
                    for line in table.column("line").to_pylist():
                        row = next((r for r in valid if r.line == line), None)
                        if row is None:
                            raise RunnerError(f"{reader.name} changed while it was read; submit it again")
                        extras.append(row.extra)
                    for col, typ in columns.types.items():
                        values = [e.get(col) for e in extras]
                        if typ is None:
                            arr = _json_array(values)
                        else:
                            try:
                                arr = pa.array(values, typ)
                            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                                raise _Retype(col) from None
                        table = table.append_column(schema.field(columns.out[col]), arr)
                    writer.write_table(table, row_group_size=table.num_rows)
        except _Retype as e:
            columns.types[e.column] = None
            continue
        break
    pf.close()
    storage.replace(out_path, path)
