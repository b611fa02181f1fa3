"""The import layering: losses (torch only) <- contract <- models <- data; the lightning
modules use losses, models and data; merging and export use models; the command line
(cli, __main__, compare, help, callbacks) uses everything and nothing else imports it.
Every import counts, also those inside functions."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMAND_LINE = {"dafl.cli", "dafl.__main__", "dafl.compare", "dafl.help", "dafl.callbacks"}
# module -> the project modules it may import (besides dafl.errors, which every module may)
ALLOWED = {
    "dafl.errors": set(),
    "dafl.losses": set(),
    "dafl.contract": set(),
    "dafl.cpu_kernels": set(),
    "dafl.distributed": set(),
    "dafl.augment": set(),
    "dafl.resnets": set(),
    "dafl.models": {"dafl.contract", "dafl.cpu_kernels", "dafl.resnets"},
    "dafl.datasets": {"dafl.contract"},
    "dafl.data": {"dafl.augment", "dafl.contract", "dafl.datasets"},
    "dafl.procedural": {"dafl.contract", "dafl.losses"},
    "dafl.generator": {"dafl.contract", "dafl.losses", "dafl.models"},
    "dafl.zipped": {"dafl.models"},
    "dafl.zipit": {"dafl.models", "dafl.zipped"},
    "dafl.student_init": {"dafl.models", "dafl.zipit", "dafl.zipped"},
    "dafl.weights": {"dafl.models", "dafl.zipped"},
    "dafl.export": {"dafl.contract", "dafl.models", "dafl.weights"},
    "dafl.merging": {"dafl.contract", "dafl.datasets", "dafl.generator", "dafl.weights", "dafl.zipit", "dafl.zipped"},
    "dafl.__init__": {"dafl.export"},
}


def project_modules() -> dict[str, Path]:
    files = [*(REPO / "dafl").glob("*.py"), *(REPO / "lightning_modules").glob("*.py")]
    return {f"{path.parent.name}.{path.stem}": path for path in files}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        found |= {name for name in names if name.split(".")[0] in ("dafl", "lightning_modules", "scipy")}
    return found


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_imports_follow_the_layers(module):
    imported = imports_of(project_modules()[module]) - {"dafl.errors", module}
    if module in COMMAND_LINE:
        return  # the command line uses everything
    assert not imported & COMMAND_LINE, f"{module} imports the command line: {imported & COMMAND_LINE}"
    if module.startswith("lightning_modules."):
        assert not imported & {"dafl.merging", "dafl.export"}, imported
        return
    assert not any(name.startswith("lightning_modules") for name in imported), (module, imported)
    assert imported - {"scipy.optimize"} <= ALLOWED[module], (module, imported - ALLOWED[module])


def test_losses_are_torch_only():
    tree = ast.parse((REPO / "dafl" / "losses.py").read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert roots <= {"torch", "math", "__future__"}, roots
