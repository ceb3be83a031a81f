"""The layers of docs/ARCHITECTURE.md: a module imports only from its own layer or the ones below."""
import ast
from pathlib import Path

import latentdiff

PACKAGE = Path(latentdiff.__file__).parent
# lowest first; a module's layer is that of its longest matching name
LAYERS = [
    {"errors", "files", "config", "precision", "devices", "text", "prompts", "guidance", "vae", "schedulers", "optimize",
     "pngmeta", "images", "conditioning", "model_defaults"},
    {"data", "checkpoints", "adapters"},
    {"pipeline", "training", "evaluate", "generation"},
    {"commands", "server", "cli", "__init__"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imports_of(path: Path, module: str):
    tree = ast.parse(path.read_text())
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        yield from (n for n in names if n == "latentdiff" or n.startswith("latentdiff."))


def test_every_module_has_a_layer_and_imports_only_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for target in imports_of(path, module):
            if target != "latentdiff" and layer_of(target) > layer_of(module):
                upward.append(f"{module} imports {target}")
    assert not upward, upward
