"""The package's layout: the paper's modules at the top of retinanet/, few of them, importing nothing but the standard
library, torch, torchvision, numpy and each other; everything else one level down; plain values everywhere."""

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "retinanet"
CORE_DEPENDENCIES = {"torch", "torchvision", "numpy"}
READING_ORDER = ("settings", "model", "anchors", "boxes", "losses", "inference")  # README's "Read the code"


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports: top-level names of absolute imports, "." + name of relative ones."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or "").split(".")[0] if node.level else node.module.split(".")[0])
    return found


def test_the_top_of_the_package_holds_at_most_12_modules_and_3_subpackages():
    modules = sorted(path.stem for path in PACKAGE.glob("*.py"))
    assert len(modules) <= 12, modules
    assert set(READING_ORDER) <= set(modules)
    subpackages = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists())
    assert subpackages == ["data", "diagnostics", "engine"]


def test_the_core_imports_only_the_standard_library_torch_torchvision_numpy_and_itself():
    core = {path.stem for path in PACKAGE.glob("*.py")}
    for path in PACKAGE.glob("*.py"):
        for module in imported_modules(path):
            if module.startswith("."):
                assert module[1:] in core, f"{path.name} imports {module}, which is not a module of the core"
            else:
                allowed = module in sys.stdlib_module_names or module in CORE_DEPENDENCIES
                assert allowed, f"{path.name} imports {module}"


def test_no_argparse_and_no_parameter_named_args_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert "argparse" not in {name.lstrip(".") for name in imported_modules(path)}, path
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                parameters = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                assert "args" not in {parameter.arg for parameter in parameters}, f"{path}: {getattr(node, 'name', '')}"
