"""Resolve ``module:Workflow`` and ``path/to/file.py:Workflow`` to workflow classes.

Forms a target may take:

* ``package.module:Name`` (also ``module:Outer.Inner``): one workflow class;
* ``path/to/file.py:Name``: the same, from a file;
* ``package.module`` or ``path/to/file.py`` alone: every concrete ``Workflow``
  subclass defined there (not imported into it).

The current directory is importable, as with ``python -m``; a file's folder is
importable from the file, as with ``python path/to/file.py``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from reactive.cli.common import LoadError
from reactive.compiled import WorkflowDef
from reactive.dsl.workflow import Workflow
from reactive.errors import DefinitionError

__all__ = ["LoadError", "is_target", "load_module", "load_targets", "load_workflows"]

_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_MODULE_RE = _ATTR_RE


def is_target(text: str) -> bool:
    """Whether ``text`` names code (``x:Y``, ``x.py``) rather than an announced workflow id."""
    return ":" in text or text.endswith(".py") or "/" in text or "\\" in text


def _split(target: str) -> tuple[str, str | None]:
    """``where`` and the attribute path (None: every workflow defined there)."""
    where, sep, attr = target.rpartition(":")
    if not sep or not attr or "/" in attr or "\\" in attr:
        # No colon, or the colon belongs to a path (C:\...): the whole thing is the place.
        return target, None
    if not _ATTR_RE.match(attr):
        raise LoadError(
            f"{target!r}: {attr!r} is not a Python name (expected module:Workflow or file.py:Workflow)"
        )
    return where, attr


def _is_file_spec(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where or Path(where).is_file()


def _definition_error(target: str, e: DefinitionError) -> LoadError:
    return LoadError(f"{target}: invalid workflow class {e.class_name}", e.reasons)


def _import_failed(target: str, e: BaseException) -> LoadError:
    # The innermost frame in the user's code says where; the whole traceback is for -v.
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename]
    where = f" ({user[-1].filename}:{user[-1].lineno})" if user else ""
    return LoadError(f"importing {target} failed: {type(e).__name__}: {e}{where}")


def _module_name_for(file: Path) -> str:
    """The name a file is imported under: its stem when that is free, else a unique one."""
    stem = file.stem
    if stem.isidentifier():
        existing = sys.modules.get(stem)
        if existing is not None:
            if Path(getattr(existing, "__file__", "") or "").resolve() == file:
                return stem
        else:
            try:
                spec = importlib.util.find_spec(stem)
            except (ImportError, ValueError):
                spec = None
            if spec is None or (spec.origin and Path(spec.origin).resolve() == file):
                return stem
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:8]
    safe = re.sub(r"\W", "_", stem)
    return f"reactive_file_{safe}_{digest}"


def _load_file(spec_text: str, path_text: str) -> ModuleType:
    file = Path(path_text)
    if not file.is_file():
        hint = "" if file.suffix == ".py" else " (a module is named with dots: package.module)"
        raise LoadError(f"file not found: {file} (looked in {Path.cwd()}){hint}")
    if file.suffix != ".py":
        raise LoadError(f"{file} is not a Python file (.py)")
    resolved = file.resolve()
    name = _module_name_for(resolved)
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    folder = str(resolved.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise LoadError(f"cannot import {file}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    # msgspec and the workflow class pass resolve annotations through sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except DefinitionError as e:
        sys.modules.pop(name, None)
        raise _definition_error(spec_text, e) from e
    except SyntaxError as e:
        sys.modules.pop(name, None)
        raise LoadError(f"{file}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:
        sys.modules.pop(name, None)
        raise _import_failed(spec_text, e) from e
    return module


def _load_module(spec_text: str, name: str) -> ModuleType:
    if not _MODULE_RE.match(name):
        raise LoadError(
            f"{spec_text!r}: {name!r} is neither a module name (package.module) nor a .py file"
        )
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise LoadError(
                f"module not found: {missing!r} (for {spec_text}; looked in {cwd} and on sys.path)"
            ) from e
        raise _import_failed(spec_text, e) from e
    except DefinitionError as e:
        raise _definition_error(spec_text, e) from e
    except SyntaxError as e:
        raise LoadError(f"{e.filename}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:
        raise _import_failed(spec_text, e) from e


def load_module(where: str) -> ModuleType:
    """Import a module by dotted name or a ``.py`` file by path."""
    return _load_file(where, where) if _is_file_spec(where) else _load_module(where, where)


def _is_concrete(obj: Any) -> bool:
    return isinstance(obj.__dict__.get("__reactive__"), WorkflowDef)


def _describe(obj: Any) -> str:
    if inspect.ismodule(obj):
        return "a module"
    if inspect.isclass(obj):
        return f"the class {obj.__qualname__}"
    if inspect.isroutine(obj):
        return "a function"
    return f"a {type(obj).__name__}"


def _defined_in(module: ModuleType) -> list[type[Workflow]]:
    found: list[type[Workflow]] = []
    for value in vars(module).values():
        if (
            inspect.isclass(value)
            and issubclass(value, Workflow)
            and value.__module__ == module.__name__
            and _is_concrete(value)
            and value not in found
        ):
            found.append(value)
    return found


def load_workflows(target: str) -> list[type[Workflow] | Workflow]:
    """The workflow classes (or instances) a target names; LoadError with a clear message otherwise."""
    target = target.strip()
    if not target:
        raise LoadError("empty target: expected module:Workflow or path/to/file.py:Workflow")
    where, attr = _split(target)
    if not where:
        raise LoadError(f"{target!r}: no module or file before ':'")
    module = load_module(where)
    if attr is None:
        found = _defined_in(module)
        if not found:
            raise LoadError(
                f"{where} defines no workflow (no concrete Workflow subclass); "
                "name one with module:Workflow"
            )
        return list(found)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            defined = ", ".join(cls.__qualname__ for cls in _defined_in(module))
            hint = f"; workflows defined there: {defined}" if defined else ""
            raise LoadError(f"{where} has no attribute {attr!r}{hint}") from None
    if isinstance(obj, Workflow):
        if not _is_concrete(type(obj)):
            raise LoadError(f"{target} is an instance of an abstract workflow class")
        return [obj]
    if not (inspect.isclass(obj) and issubclass(obj, Workflow)):
        raise LoadError(
            f"{target} is not a workflow: it is {_describe(obj)}, not a subclass of reactive.Workflow"
        )
    if not _is_concrete(obj):
        raise LoadError(
            f"{target} is an abstract workflow class (it has no definition of its own); "
            "name a concrete subclass"
        )
    return [obj]


def load_targets(targets: Iterable[str]) -> list[type[Workflow] | Workflow]:
    """Every workflow the targets name, each once, in order."""
    out: list[type[Workflow] | Workflow] = []
    for target in targets:
        for wf in load_workflows(target):
            if wf not in out:
                out.append(wf)
    return out
