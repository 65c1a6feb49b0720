"""The architecture's one rule: micromil_core (the science and the site side) never imports
the Flower layer (flwr, server/, client/); the Flower layer builds on the core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UPWARD = ("flwr", "server", "client")


def imported_modules(path: Path) -> list[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names (any depth)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_the_core_never_imports_the_flower_layer():
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "micromil_core").rglob("*.py"))
        for name in imported_modules(path)
        if name.split(".")[0] in UPWARD
    ]
    assert offenders == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    # the rule above would pass vacuously if lazy imports were invisible to it
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from server.simulation import simulate\n    import flwr.app\n")
    assert imported_modules(f) == ["server.simulation", "flwr.app"]


def test_simulate_and_compare_come_from_the_flower_layer_without_importing_flower_early():
    # `micromil --help` lists the federation commands (registered by server/ through an
    # entry point), and building the parser loads neither Flower nor the simulation.
    code = (
        "import sys; from micromil_core.cli import build_parser; p = build_parser(); "
        "sub = next(a for a in p._actions if a.dest == 'command'); "
        "print(sorted(sub.choices)); "
        "print(any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules), 'server.simulation' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    commands, loaded = out.strip().splitlines()
    assert "'simulate'" in commands and "'compare'" in commands
    assert loaded == "False False"


def test_the_apps_load_without_the_heavy_libraries_they_use_only_in_some_messages():
    # A hospital's SuperNode starts a fresh process per Flower message; scikit-learn,
    # matplotlib and PyG (seconds each) are imported where a message needs them.
    code = (
        "import sys, client.app, client.site_app, server.app; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'matplotlib', 'torch_geometric', 'scipy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    assert out == "[]"
