"""Optional dependencies: pieces of proxsparse that need a package the base install leaves out.

``pip install 'proxsparse[EXTRA]'`` adds them: ``plot`` (matplotlib: a learning run's
``progress.png``), ``data`` (datasets and pyarrow: the ``c4`` / ``wikitext2`` hub sources and
``.parquet`` files), ``eval`` (lm_eval: zero-shot tasks), ``scale`` (torchao: 8-bit optimizer
states), ``all`` (every one of them).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ProxSparseError, first_line

# module -> (the package to install, the extra that installs it)
PACKAGES = {
    "matplotlib": ("matplotlib", "plot"),
    "datasets": ("datasets", "data"),
    "pyarrow": ("pyarrow", "data"),
    "lm_eval": ("lm_eval", "eval"),
}


def missing_message(module: str, purpose: str) -> str:
    """One line: what needs the package, and the install command of its extra."""
    package, extra = PACKAGES[module.split(".")[0]]
    return f"{purpose} needs {package}: pip install 'proxsparse[{extra}]'"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (of an optional package), or stop with one line naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        if err.name is None or err.name.split(".")[0] == top:  # the package itself is absent
            raise ProxSparseError(missing_message(module, purpose)) from err
        package, extra = PACKAGES[top]
        raise ProxSparseError(f"{package} is installed but does not import ({first_line(err)}); "
                              f"reinstall it: pip install 'proxsparse[{extra}]'") from err
