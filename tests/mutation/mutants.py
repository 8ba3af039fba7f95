"""Mutant generation for ``model/``: small, deterministic source changes made on the AST.

Each mutant is one change to one module, identified by a stable id made of the module, the
enclosing scope, the operator and the code before and after the change, so the reviewed list of
equivalent mutants (``equivalent.toml``) survives unrelated edits. Mutants are compiled from the
AST, so line numbers in tracebacks stay those of the file; nothing is ever written to disk.

Operators (chosen for what this code base decides with):

- ``compare``: ``<`` / ``<=`` / ``>`` / ``>=`` / ``==`` / ``!=`` / ``is`` / ``in`` and their
  neighbours (``<`` becomes ``<=``, ``is`` becomes ``is not``, ...);
- ``arith``: ``+`` / ``-``, ``*`` / ``/``, ``//``, ``%``, ``<<`` / ``>>``, ``&``, ``^``, also in
  augmented assignments;
- ``drop-operand``: ``a | b`` keeps one side only: in the lifecycle declaration this deletes a
  transition, elsewhere it drops a member of a union;
- ``boolop``: ``and`` / ``or``; ``not``: ``not x`` becomes ``x``; ``negate``: an ``if`` test
  that is not a comparison is negated;
- ``number``: an int or float constant ``n`` becomes ``n + 1``; ``bool``: ``True`` / ``False``;
- ``drop-element``: one element of a set, list or tuple display (an effect of a transition, a
  close code of a classification set, ...), or one argument of ``emits()`` / ``_cancel()``;
- ``guard``: a transition's ``cond=`` becomes ``unless=`` and back, or is dropped;
- ``enum``: ``Phase.OPEN`` becomes the next member of its enum (for every enum in ``model/``);
- ``delete``: a call statement, an attribute or augmented assignment, or a ``raise`` becomes
  ``pass``.

Left alone: docstrings, annotations, string constants, ``assert`` statements, ``__all__``,
``__slots__`` and ``slots=`` (memory layout), and logging calls (``self.log.info(...)``),
which no decision depends on.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import CodeType

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "steadysocket.model"


def _model_dir() -> Path:
    """Where ``steadysocket.model`` is installed, found without importing it: ``model/`` in an
    editable install, the installed copy in a tox environment (a snapshot that a concurrent
    edit of the working tree cannot change halfway through a run)."""
    spec = importlib.util.find_spec(PACKAGE)
    assert spec is not None, f"{PACKAGE} is not installed"
    assert spec.submodule_search_locations, f"{PACKAGE} is not a package"
    return Path(next(iter(spec.submodule_search_locations)))


MODEL_DIR = _model_dir()

LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical", "log"})
ARGUMENT_DROP_CALLS = frozenset({"emits", "_cancel"})
GUARD_KEYWORDS = {"cond": "unless", "unless": "cond"}

_COMPARE_SWAPS: dict[type[ast.cmpop], tuple[type[ast.cmpop], ...]] = {
    ast.Lt: (ast.LtE, ast.Gt),
    ast.LtE: (ast.Lt, ast.GtE),
    ast.Gt: (ast.GtE, ast.Lt),
    ast.GtE: (ast.Gt, ast.LtE),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}
_ARITH_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitXor: ast.BitAnd,
}


@dataclass(frozen=True, slots=True)
class Mutant:
    """One change to one module."""

    id: str
    module: str
    """The module's name inside the package, such as ``lifecycle``."""
    line: int
    operator: str
    before: str
    after: str
    index: int
    """Position of the node in a fresh parse's ``ast.walk`` order."""
    variant: int
    """Which of the operator's changes at that node (0, 1, ...)."""

    @property
    def path(self) -> Path:
        """The mutated file."""
        return MODEL_DIR / f"{self.module}.py"

    @property
    def qualified_module(self) -> str:
        """The module's import name."""
        return f"{PACKAGE}.{self.module}"

    def __str__(self) -> str:
        return f"model/{self.module}.py:{self.line} [{self.operator}] {self.before} -> {self.after}"


def _short(node: ast.AST, limit: int = 90) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def enum_members(model_dir: Path = MODEL_DIR) -> dict[str, list[str]]:
    """Every enum class declared in ``model/`` with its members in declaration order."""
    enums: dict[str, list[str]] = {}
    for path in sorted(model_dir.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            if not any(isinstance(b, ast.Name) and b.id.endswith("Enum") for b in node.bases):
                continue
            members = [
                target.id
                for statement in node.body
                if isinstance(statement, ast.Assign)
                for target in statement.targets
                if isinstance(target, ast.Name) and target.id.isupper()
            ]
            if len(members) > 1:
                enums[node.name] = members
    return enums


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, asserts, logging arguments..."""
    skipped: set[int] = set()

    def skip(node: ast.AST | None) -> None:
        if node is not None:
            skipped.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                skip(body[0])
            # Attribute docstrings: a bare string after an assignment.
            for statement in body:
                if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                    skip(statement)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            skip(node.returns)
            for arg in (
                *node.args.posonlyargs,
                *node.args.args,
                *node.args.kwonlyargs,
                node.args.vararg,
                node.args.kwarg,
            ):
                if arg is not None:
                    skip(arg.annotation)
        elif isinstance(node, ast.AnnAssign):
            skip(node.annotation)
        elif (
            isinstance(node, ast.Assert | ast.JoinedStr)
            or (
                isinstance(node, ast.Assign)
                and any(
                    isinstance(t, ast.Name) and t.id in {"__all__", "__slots__"}
                    for t in node.targets
                )
            )
            or _is_log_call(node)
            or (isinstance(node, ast.If) and _is_type_checking(node.test))
            # dataclass(slots=True) is a memory layout, not behaviour.
            or (isinstance(node, ast.keyword) and node.arg == "slots")
        ):
            skip(node)
    return skipped


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _scopes(tree: ast.Module) -> dict[int, str]:
    """The qualified name of the innermost class or function around each node."""
    scope_of: dict[int, str] = {}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                inner = f"{scope}.{child.name}" if scope else child.name
            scope_of[id(child)] = inner
            visit(child, inner)

    visit(tree, "")
    return scope_of


def _parents(tree: ast.Module) -> dict[int, ast.AST]:
    return {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


# Each operator looks at one node and yields (description before, after, apply) triples; apply
# changes a fresh copy of that node's tree in place.
Apply = Callable[[ast.AST, dict[int, ast.AST]], None]
Change = tuple[str, str, str, Apply]


def _set_compare(position: int, op: type[ast.cmpop]) -> Apply:
    def apply(n: ast.AST, _: dict[int, ast.AST]) -> None:
        assert isinstance(n, ast.Compare)
        n.ops[position] = op()

    return apply


def _keep_side(side: str) -> Apply:
    def apply(n: ast.AST, parents: dict[int, ast.AST]) -> None:
        assert isinstance(n, ast.BinOp)
        _replace(n, n.left if side == "left" else n.right, parents)

    return apply


def _set_operator(op: type[ast.operator] | type[ast.boolop]) -> Apply:
    def apply(n: ast.AST, _: dict[int, ast.AST]) -> None:
        assert isinstance(n, ast.BinOp | ast.AugAssign | ast.BoolOp)
        n.op = op()

    return apply


def _unwrap(n: ast.AST, parents: dict[int, ast.AST]) -> None:
    assert isinstance(n, ast.UnaryOp)
    _replace(n, n.operand, parents)


def _flip_bool(n: ast.AST, _: dict[int, ast.AST]) -> None:
    assert isinstance(n, ast.Constant)
    n.value = not n.value


def _increment(n: ast.AST, _: dict[int, ast.AST]) -> None:
    assert isinstance(n, ast.Constant)
    assert isinstance(n.value, int | float)
    n.value = n.value + 1


def _drop_item(field: str, position: int) -> Apply:
    def apply(n: ast.AST, _: dict[int, ast.AST]) -> None:
        del getattr(n, field)[position]

    return apply


def _rename_keyword(position: int, name: str) -> Apply:
    def apply(n: ast.AST, _: dict[int, ast.AST]) -> None:
        assert isinstance(n, ast.Call)
        n.keywords[position].arg = name

    return apply


def _set_attribute(name: str) -> Apply:
    def apply(n: ast.AST, _: dict[int, ast.AST]) -> None:
        assert isinstance(n, ast.Attribute)
        n.attr = name

    return apply


def _negate_test(n: ast.AST, _: dict[int, ast.AST]) -> None:
    assert isinstance(n, ast.If | ast.IfExp)
    n.test = ast.UnaryOp(op=ast.Not(), operand=n.test)


def _to_pass(n: ast.AST, parents: dict[int, ast.AST]) -> None:
    _replace(n, ast.Pass(), parents)


def _changes(
    node: ast.AST, parents: dict[int, ast.AST], enums: dict[str, list[str]]
) -> Iterator[Change]:
    parent = parents.get(id(node))
    if isinstance(node, ast.Compare):
        for position, op in enumerate(node.ops):
            for replacement in _COMPARE_SWAPS.get(type(op), ()):
                mutated = copy.deepcopy(node)
                mutated.ops[position] = replacement()
                yield "compare", _short(node), _short(mutated), _set_compare(position, replacement)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        # Described by what goes: in the lifecycle declaration, the deleted transition(s).
        yield "drop-operand", _short(node.right), "deleted", _keep_side("left")
        yield "drop-operand", _short(node.left), "deleted", _keep_side("right")
    elif isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _ARITH_SWAPS:
        swapped = _ARITH_SWAPS[type(node.op)]
        mutated_op = copy.deepcopy(node)
        mutated_op.op = swapped()
        yield "arith", _short(node), _short(mutated_op), _set_operator(swapped)
    elif isinstance(node, ast.BoolOp):
        other: type[ast.boolop] = ast.Or if isinstance(node.op, ast.And) else ast.And
        mutated_bool = copy.deepcopy(node)
        mutated_bool.op = other()
        yield "boolop", _short(node), _short(mutated_bool), _set_operator(other)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        yield "not", _short(node), _short(node.operand), _unwrap
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            yield "bool", repr(value), repr(not value), _flip_bool
        elif isinstance(value, int | float) and not _is_negated(node, parents):
            yield "number", repr(value), repr(value + 1), _increment
    elif isinstance(node, ast.Set | ast.List | ast.Tuple) and len(node.elts) > 1:
        if not isinstance(getattr(node, "ctx", ast.Load()), ast.Load):
            return
        if isinstance(parent, ast.Subscript) or _is_unpacking_value(node, parent):
            return
        for position, element in enumerate(node.elts):
            without = f"without {_short(element, 60)}"
            yield "drop-element", _short(node), without, _drop_item("elts", position)
    elif isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name in ARGUMENT_DROP_CALLS and len(node.args) > 1:
            for position, argument in enumerate(node.args):
                without = f"without {_short(argument, 60)}"
                yield "drop-element", _short(node), without, _drop_item("args", position)
        for position, keyword in enumerate(node.keywords):
            if keyword.arg in GUARD_KEYWORDS:
                swapped_name = GUARD_KEYWORDS[keyword.arg]
                guard = _short(keyword.value, 40)
                before = f"{keyword.arg}={guard}"
                rename = _rename_keyword(position, swapped_name)
                yield "guard", before, f"{swapped_name}={guard}", rename
                yield "guard", before, "no guard", _drop_item("keywords", position)
    elif (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in enums
        and node.attr in enums[node.value.id]
    ):
        members = enums[node.value.id]
        following = members[(members.index(node.attr) + 1) % len(members)]
        after = f"{node.value.id}.{following}"
        yield "enum", _short(node), after, _set_attribute(following)
    elif isinstance(node, ast.If | ast.IfExp) and not isinstance(node.test, ast.Compare):
        yield "negate", _short(node.test), f"not ({_short(node.test)})", _negate_test
    if _deletable(node):
        yield "delete", _short(node), "pass", _to_pass


def _is_negated(node: ast.Constant, parents: dict[int, ast.AST]) -> bool:
    parent = parents.get(id(node))
    return isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.USub)


def _is_unpacking_value(node: ast.AST, parent: ast.AST | None) -> bool:
    """A tuple on the right of ``a, b = x, y`` or ``return a, b``: dropping breaks the shape
    only, which every caller notices at once; not worth a mutant."""
    return isinstance(parent, ast.Return) or (
        isinstance(parent, ast.Assign) and isinstance(parent.targets[0], ast.Tuple)
    )


def _is_log_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in LOG_METHODS
    )


def _deletable(node: ast.AST) -> bool:
    if isinstance(node, ast.Expr):
        return isinstance(node.value, ast.Call) and not _is_log_call(node.value)
    if isinstance(node, ast.Assign):
        return all(isinstance(t, ast.Attribute | ast.Subscript) for t in node.targets)
    return isinstance(node, ast.AugAssign | ast.Raise)


def _replace(old: ast.AST, new: ast.AST, parents: dict[int, ast.AST]) -> None:
    parent = parents[id(old)]
    ast.copy_location(new, old)
    for field, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, field, new)
            return
        if isinstance(value, list):
            for position, item in enumerate(value):
                if item is old:
                    value[position] = new
                    return
    raise AssertionError(f"{old!r} not found in its parent")


def generate(module: str, source: str | None = None) -> list[Mutant]:
    """Every mutant of ``model/<module>.py`` (or of ``source``, for tests)."""
    text = source if source is not None else (MODEL_DIR / f"{module}.py").read_text("utf-8")
    tree = ast.parse(text)
    skipped = _skipped_nodes(tree)
    scopes = _scopes(tree)
    parents = _parents(tree)
    enums = enum_members()
    found: list[tuple[str, Mutant]] = []
    for index, node in enumerate(ast.walk(tree)):
        if id(node) in skipped:
            continue
        for variant, (operator, before, after, _) in enumerate(_changes(node, parents, enums)):
            scope = scopes.get(id(node), "") or "<module>"
            base = f"{module}:{scope}:{operator}: {before} -> {after}"
            line = getattr(node, "lineno", 0)
            found.append(
                (base, Mutant(base, module, line, operator, before, after, index, variant))
            )
    seen: dict[str, int] = {}
    mutants: list[Mutant] = []
    for base, mutant in found:
        count = seen.get(base, 0) + 1
        seen[base] = count
        mutant_id = base if count == 1 else f"{base} #{count}"
        mutants.append(
            Mutant(
                mutant_id,
                mutant.module,
                mutant.line,
                mutant.operator,
                mutant.before,
                mutant.after,
                mutant.index,
                mutant.variant,
            )
        )
    return mutants


def mutated_tree(mutant: Mutant, source: str | None = None) -> ast.Module:
    """A fresh parse of the module (or of ``source``) with the mutant's change applied."""
    text = source if source is not None else mutant.path.read_text("utf-8")
    tree = ast.parse(text)
    parents = _parents(tree)
    node = list(ast.walk(tree))[mutant.index]
    changes = list(_changes(node, parents, enum_members()))
    _, before, after, apply = changes[mutant.variant]
    assert (before, after) == (mutant.before, mutant.after), f"{mutant.id}: source changed"
    apply(node, parents)
    return ast.fix_missing_locations(tree)


def compile_mutant(mutant: Mutant, source: str | None = None) -> CodeType:
    """The mutated module's code object, with the file's own name and line numbers."""
    return compile(mutated_tree(mutant, source), str(mutant.path), "exec")
