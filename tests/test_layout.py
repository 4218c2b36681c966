"""The package's layers: no module of qtools/ imports a layer above its own.

io and demo (files, fixtures) <- survival (the analysis and its rule) <- pipeline (fuse,
quantize, validate, compare) <- calibrate <- commands <- cli. Imports are read with `ast`,
function-level ones included, so a lazy import cannot hide an upward arrow.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qtools"

# layer -> the layers it must not import
FORBIDDEN = {
    "root": {"io", "demo", "survival", "pipeline", "calibrate", "commands", "cli"},  # __init__, format
    "io": {"demo", "survival", "pipeline", "calibrate", "commands", "cli"},
    "demo": {"survival", "pipeline", "calibrate", "commands", "cli"},
    "survival": {"demo", "pipeline", "calibrate", "commands", "cli"},
    "pipeline": {"demo", "calibrate", "commands", "cli"},
    "calibrate": {"commands", "cli"},
    "commands": {"cli"},
    "cli": set(),
}


def layer(first: str, is_module_file: bool) -> str:
    """The layer of qtools.<first>...: a subpackage, cli.py, or the root modules."""
    if not is_module_file or first == "cli":
        return first
    return "root"


def imported_layers(path: Path, package: Path) -> set:
    """The qtools layers a module imports: relative and absolute, at any depth of the code."""
    here = ("qtools", *path.relative_to(package).parts[:-1])  # the package the module is in
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [tuple(a.name.split(".")) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else ()
            mod = base + tuple(node.module.split(".")) if node.module else base
            # `from .. import pipeline` names a subpackage, `from .. import QtoolsError` does not
            targets = [mod + (a.name,) for a in node.names]
        else:
            continue
        for t in targets:
            if len(t) < 2 or t[0] != "qtools":
                continue
            if (package / t[1]).is_dir():
                found.add(layer(t[1], False))
            elif (package / f"{t[1]}.py").is_file():
                found.add(layer(t[1], True))
    return found


def upward_imports(package: Path = PACKAGE) -> list:
    out = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).parts
        mine = layer(parts[0].removesuffix(".py"), len(parts) == 1)
        for other in sorted(imported_layers(path, package) & FORBIDDEN[mine]):
            out.append(f"{path.relative_to(package.parent)} ({mine}) imports {other}")
    return out


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_checker_sees_relative_absolute_and_function_level_imports(tmp_path):
    pkg = tmp_path / "qtools"
    for d in ("io", "pipeline", "commands"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("from .commands import x\n")
    (pkg / "io" / "a.py").write_text("def f():\n    from ..pipeline import quantize\n")
    (pkg / "io" / "b.py").write_text("import qtools.commands.fuse\nfrom .. import format, QtoolsError\n")
    (pkg / "io" / "c.py").write_text("from qtools import cli\n")
    (pkg / "pipeline" / "d.py").write_text("from ..io import a\nfrom qtools import io\n")
    (pkg / "format.py").write_text("from .io import a\n")
    assert upward_imports(pkg) == ["qtools/format.py (root) imports io",
                                   "qtools/io/a.py (io) imports pipeline",
                                   "qtools/io/b.py (io) imports commands",
                                   "qtools/io/c.py (io) imports cli"]


# The package's own private native module, re-exported by the modules that wrap it.
PRIVATE_ALLOWED = {"_ext"}
# The one module allowed to reach into another library's private names (each reach tested).
COMPAT = "qtools/compat.py"


def private_imports(package: Path = PACKAGE) -> list:
    """`from X import _name` where X is another module: what one module needs of another is public.
    Private names of other libraries are imported only in qtools/compat.py."""
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = str(path.relative_to(package.parent))
        tree = ast.parse(path.read_text(), str(path))
        # names bound to qtools modules (`from . import recipes_mlx as rm`, `import qtools.x as y`):
        # `rm._name` reaches into another module as much as `from .recipes_mlx import _name`
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("qtools")):
                modules.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                modules.update(a.asname for a in node.names if a.asname and a.name.startswith("qtools."))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and node.attr not in PRIVATE_ALLOWED):
                out.append(f"{rel} uses {node.value.id}.{node.attr}")
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            ours = node.level > 0 or (node.module or "").split(".")[0] == "qtools"
            for a in node.names:
                private = a.name.startswith("_") and not a.name.startswith("__") and a.name not in PRIVATE_ALLOWED
                if private and (ours or rel != COMPAT):
                    src = "." * node.level + (node.module or "")
                    out.append(f"{rel} imports {a.name} from {src}")
    return sorted(out)


def test_no_module_imports_another_modules_private_name():
    assert private_imports() == []


def test_the_private_import_checker_sees_relative_absolute_and_foreign_imports(tmp_path):
    pkg = tmp_path / "qtools"
    (pkg / "pipeline").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "compat.py").write_text("from mlx_lm.utils import _get_classes\nfrom .pipeline.a import _x\n")
    (pkg / "pipeline" / "a.py").write_text("from .b import _tail, public\nfrom .. import _ext\n")
    (pkg / "pipeline" / "b.py").write_text("def f():\n    from qtools.pipeline.a import _y\n"
                                           "from click.parser import _OptionParser\nfrom x import __version__\n")
    (pkg / "pipeline" / "c.py").write_text("from . import a as rm\nimport qtools.pipeline.b as B\n"
                                           "rm._log('x')\nB._z\nrm.__doc__\nself._ok\n")
    assert private_imports(pkg) == ["qtools/compat.py imports _x from .pipeline.a",
                                    "qtools/pipeline/a.py imports _tail from .b",
                                    "qtools/pipeline/b.py imports _OptionParser from click.parser",
                                    "qtools/pipeline/b.py imports _y from qtools.pipeline.a",
                                    "qtools/pipeline/c.py uses B._z",
                                    "qtools/pipeline/c.py uses rm._log"]


def test_the_bit_widths_are_written_out_once():
    """SUPPORTED_BITS in qtools/__init__.py is the one list; everything else refers to it."""
    hits = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py"))
            if "2, 3, 4, 5, 6, 8" in p.read_text()]
    assert hits == ["qtools/__init__.py"]


def test_the_readme_layout_names_every_module():
    """README's Layout section names every module of qtools/ (a new module is placed there too)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    import re

    missing = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and not re.search(rf"\b{p.stem}(\.py)?\b", section)]
    assert missing == []
