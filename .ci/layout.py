"""The layout rules of dynamo_bus, checked by `./dev lint`: imports run one way between
the packages (a module imports only from its own package or a lower layer), no module
imports the CLI or the roles, no module is over 400 lines, no function over 60."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Lower layers first; a module may import from its own layer's package or any lower layer.
LAYERS = [
    {"errors", "config", "hashing", "loop"},
    {"bus", "models"},
    {"kvbm"},
    {"routing", "engines", "transfer"},
    {"worker", "serving"},
    {"traces"},
    {"roles"},
    {"cli"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _part(module: str) -> str:
    """``dynamo_bus.routing.router`` -> ``routing``; ``dynamo_bus.cli`` -> ``cli``."""
    return module.split(".")[1] if module.count(".") else module


def check(root: Path) -> list[str]:
    problems = []
    for path in sorted((root / "dynamo_bus").rglob("*.py")):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if module == "dynamo_bus":
            continue
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            problems.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES})")
        here = _part(module)
        if here not in RANK:
            problems.append(f"{rel}: {here} is in no layer: add it to LAYERS in .ci/layout.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{rel}:{node.lineno} {node.name}: {length} lines "
                                    f"(at most {MAX_FUNCTION_LINES})")
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.module
                       else [])
            for target in targets:
                if not target.startswith("dynamo_bus."):
                    continue
                there = _part(target)
                if there in ("cli", "roles") and here != "cli":
                    problems.append(f"{rel}:{node.lineno} imports {target}: nothing imports "
                                    f"the CLI or the roles")
                elif RANK.get(there, 0) > RANK.get(here, len(LAYERS)):
                    problems.append(f"{rel}:{node.lineno} imports {target}: {here} may not "
                                    f"import from {there} (a higher layer)")
    return problems


if __name__ == "__main__":
    found = check(Path(__file__).resolve().parents[1])
    print("\n".join(found) or "layout: imports run one way; modules and functions are short")
    sys.exit(1 if found else 0)
