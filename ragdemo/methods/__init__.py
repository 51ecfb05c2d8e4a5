"""The method registry: every module in this folder that defines a `Method` subclass with a `name` is found here."""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import UserError
from .base import Method, Params, PromptMethod, Result, StorageAccount

_REGISTRY: dict[str, type[Method]] = {}


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    for cls in _subclasses(Method):
        if cls.name:
            _REGISTRY[cls.name] = cls


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def registry() -> dict[str, type[Method]]:
    if not _REGISTRY:
        _discover()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def get_method(name: str) -> Method:
    methods = registry()
    if name not in methods:
        raise UserError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name]()


def parse_methods(text: str | list[str] | None, default: list[str]) -> list[str]:
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else (text or default)) if n.strip()]
    if not names:
        raise UserError("no methods given")
    for name in names:
        get_method(name)
    return names


__all__ = ["Method", "Params", "PromptMethod", "Result", "StorageAccount", "registry", "get_method", "parse_methods"]
