"""The commands' own psycopg connection takes asyncpg's ``$n`` parameters."""

from __future__ import annotations

from asyncpool.cli._server import _PsycopgDirect


def test_numbered_parameters_become_named_ones_and_a_literal_percent_is_doubled() -> None:
    sql = "SELECT $1::int, $2 LIKE 'a%' AND $1 > 0 FROM t WHERE x = ANY($10::int[])"
    args = tuple(range(1, 11))
    query, params = _PsycopgDirect._query(sql, args)
    assert query == (
        "SELECT %(p1)s::int, %(p2)s LIKE 'a%%' AND %(p1)s > 0 FROM t WHERE x = ANY(%(p10)s::int[])"
    )
    assert params == {f"p{n}": n for n in range(1, 11)}


def test_a_statement_without_parameters_is_left_as_it_is() -> None:
    assert _PsycopgDirect._query("SELECT '100%'", ()) == ("SELECT '100%'", None)
