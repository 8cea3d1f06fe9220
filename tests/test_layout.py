"""The package's layout: the reading path at the top of retinanet/, the paper's modules among it importing nothing but
the standard library, torch, torchvision, numpy and each other; every other feature one level down, imported by the
path's modules only inside the function that needs it; plain values everywhere."""

import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "retinanet"
CORE_DEPENDENCIES = {"torch", "torchvision", "numpy"}
PAPER_MODULES = ("settings", "model", "anchors", "losses", "inference")  # README's "Read the code", with the paper
PATH_MODULES = ("dataloader", "evaluation", "checkpoint", "training")  # what a run needs beside them


def requirements() -> set[str]:
    """The import names of requirements.txt's packages."""
    names = {line.split(">")[0].split("<")[0].split("=")[0].split("#")[0].strip()
             for line in (ROOT / "requirements.txt").read_text().splitlines()}
    renamed = {"pillow": "PIL", "scikit-image": "skimage"}
    return {renamed.get(name, name) for name in names if name}


def imports(path: pathlib.Path, module_level: bool) -> set[str]:
    """The modules a file imports (at module level only, or anywhere): top-level names of absolute imports, "." +
    name of relative ones."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or "").split(".")[0] if node.level else node.module.split(".")[0])
    return found


def test_the_top_of_the_package_holds_the_reading_path_and_three_subpackages():
    modules = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")
    assert modules == sorted(PAPER_MODULES + PATH_MODULES)
    subpackages = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists())
    assert subpackages == ["data", "diagnostics", "extras"]


def test_the_papers_modules_import_only_the_standard_library_torch_torchvision_numpy_and_each_other():
    for name in PAPER_MODULES:
        for module in imports(PACKAGE / f"{name}.py", module_level=False):
            if module.startswith("."):
                assert module[1:] in PAPER_MODULES, f"{name}.py imports {module}"
            else:
                assert module in sys.stdlib_module_names or module in CORE_DEPENDENCIES, f"{name}.py imports {module}"


def test_the_path_imports_the_features_off_it_only_where_they_are_used():
    for name in PAPER_MODULES + PATH_MODULES:
        for module in imports(PACKAGE / f"{name}.py", module_level=True):
            if module.startswith("."):
                assert module[1:] in PAPER_MODULES + PATH_MODULES, f"{name}.py imports {module} at module level"
            else:
                allowed = module in sys.stdlib_module_names or module in CORE_DEPENDENCIES | requirements()
                assert allowed, f"{name}.py imports {module}"


def test_no_argparse_and_no_parameter_named_args_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert "argparse" not in {name.lstrip(".") for name in imports(path, module_level=False)}, path
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                parameters = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                assert "args" not in {parameter.arg for parameter in parameters}, f"{path}: {getattr(node, 'name', '')}"
