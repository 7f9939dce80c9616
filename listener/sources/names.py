"""Names a user types: log names, table names and column lists, parsed as PostgreSQL would.

Table and column names go through pglast (PostgreSQL's own parser), so quoting and case
folding follow PostgreSQL exactly: `Orders` means `orders`, `"Orders"` keeps its case. Each
parse is checked by rebuilding the statement from the names found and comparing syntax trees:
anything the user typed beyond plain names (a second statement, an alias, a subquery, ONLY)
makes the trees differ and is refused. No I/O here; validate.py resolves the names in the
database.
"""

from __future__ import annotations

import re

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.stream import RawStream

from listener.errors import ConfigurationError, SourceTableError

_LOG_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


def check_log_name(name: str) -> str:
    """Return `name` if it is a valid log name: ^[a-z][a-z0-9_]{0,62}$ (as merkle.logs checks)."""
    if not isinstance(name, str) or _LOG_NAME.fullmatch(name) is None:
        raise ConfigurationError(
            f"invalid log name {name!r}: use 1 to 63 characters, a lower-case ASCII letter "
            "first, then lower-case letters, digits or '_' (for example 'orders_log')"
        )
    return name


def quote_ident(name: str) -> str:
    """The name as a double-quoted SQL identifier (inverse of parsing one)."""
    return '"' + name.replace('"', '""') + '"'


def _plain_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise SourceTableError(f"{what} must be text, got {type(text).__name__}")
    # The parser reads a C string: text after a NUL would be silently dropped.
    if "\x00" in text:
        raise SourceTableError(f"{what} {text!r} contains a NUL character; remove it")
    if not text.strip():
        raise SourceTableError(f"{what} is empty; give at least one name")
    return text


def _parse_one(sql_text: str, what: str, shown: str) -> ast.Node:
    try:
        stmts = parse_sql(sql_text)
    except ParseError as exc:
        raise SourceTableError(
            f"cannot parse {what} {shown!r}: {exc}; write names as SQL identifiers, "
            'double-quoting any with capitals, spaces or punctuation (for example "Order Items")'
        ) from None
    if len(stmts) != 1:
        raise SourceTableError(
            f"{what} {shown!r} contains {len(stmts)} SQL statements; give names only"
        )
    return stmts[0].stmt


def parse_table_name(text: str) -> tuple[str | None, str]:
    """Parse "name" or "schema.name" (parts may be quoted) into (schema or None, name).

    Unquoted parts fold to lower case as in PostgreSQL. Refuses anything else with
    SourceTableError: three-part names, aliases, ONLY, several tables, other SQL.
    """
    text = _plain_text(text, "table name")
    stmt = _parse_one("SELECT FROM " + text, "table name", text)
    from_items = getattr(stmt, "fromClause", None) or ()
    rv = from_items[0] if len(from_items) == 1 else None
    if not isinstance(rv, ast.RangeVar):
        raise SourceTableError(
            f"table name {text!r} is not a plain table name; give name or schema.name "
            '(quote parts that need it, for example "Sales"."Orders")'
        )
    if rv.catalogname is not None:
        raise SourceTableError(
            f"table name {text!r} has three parts; give name or schema.name "
            "(a database name is not allowed: connect to that database instead)"
        )
    parts = [p for p in (rv.schemaname, rv.relname) if p is not None]
    rebuilt = "SELECT FROM " + ".".join(quote_ident(p) for p in parts)
    if parse_sql(rebuilt)[0].stmt != stmt:
        raise SourceTableError(
            f"table name {text!r} contains more than a table name; give name or schema.name only"
        )
    return rv.schemaname, rv.relname


def parse_column_list(text: str) -> list[str]:
    """Parse a comma-separated list of column names: 'a,b,"Weird Col"' -> ["a", "b", "Weird Col"].

    Unquoted names fold to lower case as in PostgreSQL. Requires at least one name and no
    name twice; refuses qualified names, expressions and other SQL with SourceTableError.
    """
    text = _plain_text(text, "column list")
    stmt = _parse_one("SELECT " + text, "column list", text)
    names: list[str] = []
    for target in getattr(stmt, "targetList", None) or ():
        val = target.val
        if isinstance(val, ast.ColumnRef) and len(val.fields) > 1:
            raise SourceTableError(
                f"column list {text!r} has the qualified name {RawStream()(val)}; "
                "give bare column names of the source table"
            )
        if not (isinstance(val, ast.ColumnRef) and isinstance(val.fields[0], ast.String)):
            raise SourceTableError(
                f"column list {text!r} contains {RawStream()(val)!r}, which is not a column "
                'name; give names separated by commas, double-quoting keywords (for example "user")'
            )
        names.append(val.fields[0].sval)
    rebuilt = "SELECT " + ", ".join(quote_ident(n) for n in names)
    if not names or parse_sql(rebuilt)[0].stmt != stmt:
        raise SourceTableError(
            f"column list {text!r} contains more than column names; give names separated by commas"
        )
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise SourceTableError(f"column list {text!r} names column {n!r} twice; list it once")
        seen.add(n)
    return names
