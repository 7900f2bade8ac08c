"""The coordinator's shape, checked from its source with `ast`: imports run one way (no circles), and each
lifecycle field is written only by its owner (STYLE.md, "One owner per lifecycle")."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "coordinator"

# Each lifecycle field, the one module that may write it, and the value a row may be born with elsewhere.
OWNERS: dict[str, tuple[str, ...]] = {
    # field: modules allowed to assign it (as attribute, in update().values(...), or in a row's constructor)
    "JobModel.status": ("coordinator/services/job_states.py",),
    "LeaseModel.status": ("coordinator/services/lease_states.py",),
    "WorkerModel.state": ("coordinator/services/worker_states.py",),
    "WorkerModel.reliability": ("coordinator/services/worker_states.py",),
    "WorkerModel.suspended_at": ("coordinator/services/worker_states.py",),
    "WorkerModel.revoked_at": ("coordinator/services/worker_states.py",),
    "WorkerModel.failed_checks": ("coordinator/services/worker_states.py",),
    "WorkerModel.lost_leases": ("coordinator/services/worker_states.py",),
    "WorkerModel.completed_leases": ("coordinator/services/worker_states.py",),
    "WorkerModel.preempted_leases": ("coordinator/services/worker_states.py",),
    "WorkerModel.preemption_strikes": ("coordinator/services/worker_states.py",),
    "WorkerModel.unconfirmed_claims": ("coordinator/services/worker_states.py",),
    "WorkerModel.inherited_lost": ("coordinator/services/worker_states.py",),
    "LeaseModel.claim": ("coordinator/services/lease_states.py",),
    "JobModel.excluded_providers": ("coordinator/services/job_states.py",),
    "JobModel.excluded_workers": ("coordinator/services/job_states.py",),
    "OutboxModel.status": ("coordinator/services/outbox.py",),
    "TopupModel.status": ("coordinator/services/topups.py",),
    "PayoutModel.status": ("coordinator/services/payouts.py",),
    "BatchRequestModel.status": ("coordinator/services/batch_leases.py",),  # answered once, by the first report
}
BIRTHS = {  # a row may be created anywhere, in its first state only
    "JobModel.status": "JobStatus.validating_files",
    "LeaseModel.status": "LeaseStatus.assigned",
    "WorkerModel.state": "WorkerState.offline",
    "OutboxModel.status": "OutboxStatus.pending",
    "TopupModel.status": "TopupStatus.pending",
    "PayoutModel.status": "PayoutStatus.pending",
}
# How a variable names its row in this codebase (`job.status = ...`, `f.lease.status = ...`).
ROW_NAMES = {"job": "JobModel", "lease": "LeaseModel", "worker": "WorkerModel", "row": "OutboxModel",
             "uploader": "WorkerModel", "topup": "TopupModel", "payout": "PayoutModel", "request_row": "BatchRequestModel"}
FIELDS = {name.split(".")[1] for name in OWNERS}


def _modules(package: str = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `module` imports, at any depth of the file (a function-level import is still a
    dependency)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.update(name for name in names if name in known and name != module)
    return out


def import_cycles(package: str = PACKAGE) -> list[list[str]]:
    """Every circle of imports among the package's modules (strongly connected components of more than one)."""
    modules = _modules(package)
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_the_coordinators_imports_have_no_circles() -> None:
    assert import_cycles() == []


def test_the_cycle_check_finds_a_circle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert import_cycles("pkg") == [["pkg.a", "pkg.b"]]


@dataclass(frozen=True)
class Write:
    path: str
    line: int
    field: str  # "JobModel.status"; "?.status" when the row's kind cannot be told from the code
    birth: str | None = None  # the value, when the write is a row's constructor


def _row_kind(node: ast.expr) -> str:
    """`job` / `f.job` / `self.job` -> JobModel; `?` when the name says nothing."""
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return ROW_NAMES.get(name, "?")


def writes(path: Path) -> list[Write]:
    """Every write of a lifecycle field in one file: `x.status = ...` (plain, tuple or augmented),
    `update(Model)....values(status=...)`, and `Model(status=...)`."""
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), filename=str(path))
    statements = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                  for t in node.targets if isinstance(t, ast.Name)}  # `_MOVE = update(JobModel)...`
    found: list[Write] = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            for target in node.targets:
                targets.extend(target.elts if isinstance(target, ast.Tuple) else [target])
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets.append(node.target)
        for target in targets:
            if isinstance(target, ast.Attribute) and target.attr in FIELDS:
                found.append(Write(rel, target.lineno, f"{_row_kind(target.value)}.{target.attr}"))
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "values":
                model = _updated_model(func.value, statements)
                found.extend(Write(rel, node.lineno, f"{model}.{kw.arg}") for kw in node.keywords if kw.arg in FIELDS)
            elif isinstance(func, ast.Name) and func.id.endswith("Model"):
                found.extend(Write(rel, node.lineno, f"{func.id}.{kw.arg}", birth=ast.unparse(kw.value))
                             for kw in node.keywords if kw.arg in FIELDS)
    return sorted(found, key=lambda w: w.line)


def _updated_model(node: ast.expr, statements: dict[str, ast.expr]) -> str:
    """The table of `update(WorkerModel).where(...)` in a `.values(...)` chain (through a module-level name)."""
    seen: set[str] = set()
    while True:
        if isinstance(node, ast.Name) and node.id in statements and node.id not in seen:
            seen.add(node.id)
            node = statements[node.id]
            continue
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "update" and node.args:
                first = node.args[0]
                while isinstance(first, ast.Attribute):  # update(JobModel.__table__)
                    first = first.value
                return first.id if isinstance(first, ast.Name) else "?"
            node = node.func
        elif isinstance(node, ast.Attribute):
            node = node.value
        else:
            return "?"


def offending(write: Write) -> str | None:
    if write.birth is not None:
        allowed_birth = BIRTHS.get(write.field)
        owners = OWNERS.get(write.field, ())
        if allowed_birth is None or write.birth == allowed_birth or write.path in owners:
            return None
        return f"{write.path}:{write.line} creates a row with {write.field}={write.birth}"
    kind, _, attr = write.field.partition(".")
    candidates = [f for f in OWNERS if f.endswith(f".{attr}") and (kind == "?" or f.startswith(f"{kind}."))]
    if candidates and all(write.path in OWNERS[f] for f in candidates):
        return None
    if not candidates:
        return None  # not a lifecycle field of a known row (e.g. a dataclass of its own)
    return f"{write.path}:{write.line} writes {write.field} outside its owner"


def test_each_lifecycle_field_is_written_only_by_its_owner() -> None:
    problems = [p for path in _modules().values() for w in writes(path) if (p := offending(w))]
    assert problems == []


def test_the_owner_check_catches_a_stray_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    stray = tmp_path / "coordinator" / "services" / "leases.py"
    stray.parent.mkdir(parents=True)
    stray.write_text(
        "def f(job, f, worker, conn):\n"
        "    job.status = JobStatus.failed\n"
        "    f.worker.state, f.worker.pause_reason = WorkerState.paused, 'x'\n"
        "    conn.execute(update(WorkerModel).where(True).values(state=WorkerState.offline))\n"
        "    LeaseModel(id='x', status=LeaseStatus.running)\n"
        "    LeaseModel(id='y', status=LeaseStatus.assigned)\n"
        "    worker.failed_checks += 1\n"
    )
    found = [offending(w) for w in writes(stray)]
    assert [p.split(" ", 1)[1] for p in found if p] == [
        "writes JobModel.status outside its owner",
        "writes WorkerModel.state outside its owner",
        "writes WorkerModel.state outside its owner",
        "creates a row with LeaseModel.status=LeaseStatus.running",
        "writes WorkerModel.failed_checks outside its owner",
    ]
