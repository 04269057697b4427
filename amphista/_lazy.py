"""Module attributes imported on first use (PEP 562), for packages whose contents load torch."""

from __future__ import annotations

import importlib


def lazy_module(package: str, exports: dict[str, str]):
    """`__getattr__, __dir__` for `package`: a name in `exports` is imported from its submodule
    (`exports[name]`, relative to `package`) on first use; any other name is tried as a submodule."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        else:
            try:
                value = importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":
                    raise  # the submodule exists but needs something absent: say what
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
