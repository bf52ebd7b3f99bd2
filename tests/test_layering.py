"""Import directions between the packages (issue 13, item 7): the models and the diffusion math
depend on nothing above them, the data layer on neither the trainers nor the pipelines, and no
library module on the CLI; the run I/O (`runs`, `images`) on nothing that uses it. Read from
the source with `ast` (imports inside functions count)."""

import ast
import pathlib

from conftest import REPO

PACKAGE = REPO / "ldm_jax"
# Which parts of ldm_jax each layer may not import (a part: a subpackage or a top-level module).
FORBIDDEN = {
    "models": {"data", "train", "convert", "eval", "pipeline", "model", "runs", "images"},
    "diffusion": {"data", "train", "convert", "eval", "pipeline", "model", "runs", "images"},
    "data": {"train", "eval", "pipeline", "model"},
    # The shared run I/O sits below everything that reads or writes runs.
    "runs": {"train", "eval", "pipeline", "model", "data", "convert"},
    "images": {"train", "eval", "pipeline", "model", "data", "convert", "runs"},
}
CLI = {"cli"}  # the package of commands


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: pathlib.Path):
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ldm_jax":  # from ldm_jax import cli, pipeline
                targets = [f"ldm_jax.{a.name}" for a in node.names]
            else:
                targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("ldm_jax."):
                yield module, target


def test_layers_import_only_downward():
    edges = {(m, t) for path in PACKAGE.rglob("*.py") for m, t in _imports(path)}
    assert len(edges) > 100  # the walk found the package's imports
    upward = set()
    for module, target in edges:
        if _part(target) in FORBIDDEN.get(_part(module), ()):
            upward.add((module, _part(target)))
        if _part(target) in CLI and _part(module) not in CLI:
            upward.add((module, _part(target)))
    assert upward == set(), "imports against the layering (see FORBIDDEN)"
