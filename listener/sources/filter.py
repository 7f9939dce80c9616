"""The row filter of a source (`--where`): a whitelist check of its syntax tree.

A filter decides which rows of a source table become leaves, so it is evaluated inside the
capture path (trigger or replication consumer) for every row. It must therefore be a pure
predicate over the row: it may use only

  * column references by bare name (no table or schema qualification, no `*`);
  * constants, typed literals and casts to the built-in scalar types in `_CAST_TYPES`;
  * AND, OR, NOT and parentheses;
  * the operators in `_OPERATORS`, LIKE / ILIKE / NOT LIKE / NOT ILIKE, [NOT] IN with a list
    of constants, [NOT] BETWEEN, IS [NOT] NULL, IS [NOT] TRUE / FALSE.

Everything else is refused, by name: function calls (volatile ones like random(), now(),
nextval() included), subqueries, parameters, comments, schema-qualified operators, and
operators left out on purpose. Regular-expression matching (`~`, `~*`, `!~`, `!~*`,
SIMILAR TO) is refused: a pattern's cost can grow badly with the input, and the filter runs
inside every writer's transaction. The filter text that is stored is pglast's deparse of the
checked tree, never the user's text. Type checking against the table is validate.py's job.
"""

from __future__ import annotations

import copy

from pglast import ast, enums, parse_sql, parser
from pglast.parser import ParseError
from pglast.stream import RawStream

from listener.errors import SourceTableError

# Binary and unary operators as the parser names them (`!=` is read as `<>`).
_OPERATORS = frozenset({"=", "<>", "<", ">", "<=", ">=", "+", "-", "*", "/", "%"})
# LIKE, NOT LIKE, ILIKE, NOT ILIKE as the parser names them.
_LIKE_OPERATORS = frozenset({"~~", "!~~", "~~*", "!~~*"})

_K = enums.A_Expr_Kind
_BETWEEN_KINDS = frozenset({_K.AEXPR_BETWEEN, _K.AEXPR_NOT_BETWEEN})

# Built-in scalar types a constant or column may be cast to, by the name the parser gives
# (`integer` is read as pg_catalog.int4). money is left out: its text depends on lc_monetary.
_CAST_TYPES = frozenset({
    "bool", "int2", "int4", "int8", "numeric", "float4", "float8",
    "text", "varchar", "bpchar", "char",
    "date", "time", "timetz", "timestamp", "timestamptz", "interval",
    "uuid", "bytea", "inet", "cidr", "macaddr", "macaddr8", "bit", "varbit",
})
_DATETIME_TYPES = frozenset({"date", "time", "timetz", "timestamp", "timestamptz"})
# Input strings whose value is the time of evaluation, not a fixed constant.
_MOVING_DATETIMES = frozenset({"now", "today", "tomorrow", "yesterday"})

# What a refused node is called in error messages; any other node is named by its class.
_NODE_NAMES = {
    "FuncCall": "a function call",
    "SubLink": "a subquery",
    "ParamRef": "a parameter",
    "SQLValueFunction": "a function-like keyword",
    "CaseExpr": "a CASE expression",
    "CoalesceExpr": "COALESCE",
    "MinMaxExpr": "GREATEST/LEAST",
    "NullIfExpr": "NULLIF",
    "A_ArrayExpr": "an ARRAY constructor",
    "RowExpr": "a ROW constructor",
    "A_Indirection": "a subscript or field selection",
    "CollateClause": "COLLATE",
    "A_Star": "*",
    "XmlExpr": "an XML expression",
    "GroupingFunc": "GROUPING",
}
_AEXPR_NAMES = {
    _K.AEXPR_OP_ANY: "ANY(...)",
    _K.AEXPR_OP_ALL: "ALL(...)",
    _K.AEXPR_DISTINCT: "IS DISTINCT FROM",
    _K.AEXPR_NOT_DISTINCT: "IS NOT DISTINCT FROM",
    _K.AEXPR_NULLIF: "NULLIF",
    _K.AEXPR_SIMILAR: "SIMILAR TO (regular expression)",
    _K.AEXPR_BETWEEN_SYM: "BETWEEN SYMMETRIC",
    _K.AEXPR_NOT_BETWEEN_SYM: "NOT BETWEEN SYMMETRIC",
}

_ALLOWED_HINT = (
    "a filter may use only bare column names, constants, casts to built-in types (x::date), AND/OR/NOT, "
    "= <> != < > <= >= + - * / %, LIKE/ILIKE, IN (constants), BETWEEN, "
    "IS [NOT] NULL and IS [NOT] TRUE/FALSE"
)
_TEMPLATE = parse_sql("SELECT 1")[0].stmt


def _refuse(expr: str, found: str) -> SourceTableError:
    return SourceTableError(f"row filter {expr!r} is refused: it contains {found}; {_ALLOWED_HINT}")


def _show(node: ast.Node) -> str:
    try:
        return RawStream()(node)
    except Exception:  # the deparser cannot print every fragment on its own
        return type(node).__name__


def check_filter(expr: str) -> tuple[str, set[str]]:
    """Check a row filter and return (normalized SQL text, names of the columns it reads).

    Requires `expr` to be one SQL boolean-looking expression built only from the whitelist
    in this module's docstring; raises SourceTableError naming the first thing refused.
    Whether the result is boolean and the columns exist is checked by validate_source.
    """
    if not isinstance(expr, str):
        raise SourceTableError(f"row filter must be text, got {type(expr).__name__}")
    if "\x00" in expr:
        # The parser reads a C string and would silently ignore everything after a NUL.
        raise SourceTableError(f"row filter {expr!r} contains a NUL character; remove it")
    if not expr.strip():
        raise SourceTableError("row filter is empty; omit --where to log every row")
    try:
        stmts = parse_sql("SELECT 1 WHERE " + expr)
    except ParseError as exc:
        raise SourceTableError(
            f"row filter {expr!r} is not a valid SQL expression: {exc}"
        ) from None
    if len(stmts) != 1:
        raise _refuse(expr, f"{len(stmts)} SQL statements (only one expression is allowed)")
    stmt = stmts[0].stmt
    where = getattr(stmt, "whereClause", None)
    # Anything after the expression (ORDER BY, UNION, LIMIT, FOR UPDATE ...) changes the
    # statement around it; the rest must be exactly "SELECT 1".
    rest = copy.copy(stmt)
    rest.whereClause = None
    if where is None or rest != _TEMPLATE:
        raise _refuse(expr, "SQL beyond a single expression")
    # Comments are dropped by the deparse; refuse them so what is stored is what was read.
    for token in parser.scan(expr):
        if token.name in ("SQL_COMMENT", "C_COMMENT"):
            raise _refuse(expr, f"a comment ({expr[token.start:token.end + 1]!r})")
    columns: set[str] = set()
    _check(where, expr, columns, constant_only=False)
    normalized = RawStream()(where)
    # The deparse must read back as the very tree that was checked.
    if parse_sql("SELECT 1 WHERE " + normalized)[0].stmt.whereClause != where:
        raise SourceTableError(
            f"row filter {expr!r} cannot be normalized faithfully; simplify it and retry"
        )
    return normalized, columns


def moving_datetime_literals(row_filter: str) -> set[str]:
    """String constants in a checked filter that PostgreSQL reads as the current time
    ('now', 'today', ...) if they meet a date/time column, for example `created > 'now'`.

    Requires `row_filter` to be the normalized text returned by check_filter. Whether such a
    constant actually meets a date/time column depends on the table: validate_source decides.
    """
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, (list, tuple)):
            for item in node:
                walk(item)
        elif isinstance(node, ast.A_Const):
            if isinstance(node.val, ast.String) and node.val.sval.strip().lower() in _MOVING_DATETIMES:
                found.add(node.val.sval)
        elif isinstance(node, ast.Node):
            for slot in node:
                walk(getattr(node, slot))

    walk(parse_sql("SELECT 1 WHERE " + row_filter)[0].stmt.whereClause)
    return found


def _check(node: ast.Node, expr: str, columns: set[str], *, constant_only: bool) -> None:
    """Walk `node`, refusing anything not on the whitelist; collect column names."""
    if isinstance(node, ast.A_Const):
        return
    if isinstance(node, ast.ColumnRef):
        _check_column(node, expr, columns, constant_only)
    elif isinstance(node, ast.TypeCast):
        _check_cast(node, expr, columns, constant_only)
    elif isinstance(node, ast.BoolExpr):
        for arg in node.args:
            _check(arg, expr, columns, constant_only=constant_only)
    elif isinstance(node, ast.NullTest):
        _check(node.arg, expr, columns, constant_only=constant_only)
    elif isinstance(node, ast.BooleanTest):
        if node.booltesttype in (enums.BoolTestType.IS_UNKNOWN, enums.BoolTestType.IS_NOT_UNKNOWN):
            raise _refuse(expr, "IS [NOT] UNKNOWN (write IS [NOT] NULL)")
        _check(node.arg, expr, columns, constant_only=constant_only)
    elif isinstance(node, ast.A_Expr):
        _check_a_expr(node, expr, columns, constant_only)
    else:
        name = type(node).__name__
        raise _refuse(expr, f"{_NODE_NAMES.get(name, name)} ({_show(node)})")


def _check_column(node: ast.ColumnRef, expr: str, columns: set[str], constant_only: bool) -> None:
    fields = node.fields
    if any(isinstance(f, ast.A_Star) for f in fields):
        raise _refuse(expr, "* (name the columns)")
    if len(fields) != 1:
        raise _refuse(expr, f"the qualified column reference {_show(node)} (use the bare column name)")
    if constant_only:
        raise _refuse(expr, f"the column {_show(node)} inside an IN list (only constants are allowed there)")
    columns.add(fields[0].sval)


def _check_cast(node: ast.TypeCast, expr: str, columns: set[str], constant_only: bool) -> None:
    tn = node.typeName
    names = [n.sval for n in tn.names]
    builtin = len(names) == 1 or (len(names) == 2 and names[0] == "pg_catalog")
    if not builtin or names[-1] not in _CAST_TYPES or tn.setof or tn.pct_type or tn.arrayBounds:
        raise _refuse(expr, f"a cast to {_show(tn)} (only built-in scalar types are allowed)")
    for mod in tn.typmods or ():
        if not (isinstance(mod, ast.A_Const) and isinstance(mod.val, ast.Integer)):
            raise _refuse(expr, f"a type modifier {_show(mod)} that is not an integer constant")
    arg = node.arg
    if (
        names[-1] in _DATETIME_TYPES
        and isinstance(arg, ast.A_Const)
        and isinstance(arg.val, ast.String)
        and arg.val.sval.strip().lower() in _MOVING_DATETIMES
    ):
        raise _refuse(expr, f"{_show(node)}, whose value changes with the time it is evaluated")
    _check(arg, expr, columns, constant_only=constant_only)


def _check_a_expr(node: ast.A_Expr, expr: str, columns: set[str], constant_only: bool) -> None:
    kind = node.kind
    names = [n.sval for n in node.name]
    if kind in _AEXPR_NAMES:
        raise _refuse(expr, _AEXPR_NAMES[kind])
    if len(names) != 1:
        raise _refuse(expr, f"the schema-qualified operator OPERATOR({'.'.join(names)})")
    op = names[0]
    if kind == _K.AEXPR_OP:
        if op not in _OPERATORS and op not in _LIKE_OPERATORS:
            raise _refuse(expr, f"the operator {op}")
        operands = [node.lexpr, node.rexpr]
    elif kind in (_K.AEXPR_LIKE, _K.AEXPR_ILIKE):
        if op not in _LIKE_OPERATORS:
            raise _refuse(expr, f"the operator {op}")
        operands = [node.lexpr, node.rexpr]
    elif kind == _K.AEXPR_IN:
        if op not in ("=", "<>") or not isinstance(node.rexpr, (list, tuple)):
            raise _refuse(expr, "an IN form other than [NOT] IN (constant, ...)")
        _check(node.lexpr, expr, columns, constant_only=constant_only)
        for item in node.rexpr:
            _check(item, expr, columns, constant_only=True)
        return
    elif kind in _BETWEEN_KINDS:
        operands = [node.lexpr, *node.rexpr]
    else:
        raise _refuse(expr, f"the expression kind {kind.name}")
    for operand in operands:
        if operand is not None:  # a prefix operator has no left operand
            _check(operand, expr, columns, constant_only=constant_only)
