"""Edges a user meets on the user's side: option files saved by Windows editors, exports, score printing."""

from runner.cli import build_settings


def test_a_schema_or_grammar_file_with_a_byte_order_mark_is_read_as_its_text(tmp_path):
    """Notepad saves UTF-8 with a BOM; an input file, a chat template file may have one, so may these."""
    schema = tmp_path / "person.schema.json"
    schema.write_bytes(
        b'\xef\xbb\xbf{"type": "object", "properties": {"\xe5\x90\x8d\xe5\x89\x8d": {"type": "string"}}}'
    )
    grammar = tmp_path / "yesno.lark"
    grammar.write_bytes('\ufeffstart: "はい" | "いいえ"\n'.encode())
    params, _ = build_settings({"json_schema": str(schema)})
    assert params.json_schema == {"type": "object", "properties": {"名前": {"type": "string"}}}
    params, _ = build_settings({"grammar": str(grammar)})
    assert params.grammar == 'start: "はい" | "いいえ"\n'
