"""The method registry: the one place that knows which methods exist.

``register(MethodClass)`` adds a method under the name its config class declares
(``name: Literal["seeking"]``) and refuses a name that is already taken. Its config is filed in
``pktransfer.config``'s registry with the method's roles (a *start*: where the LoRA begins; an *objective*:
what it is trained toward), so the recipe's ``method`` field, every comparison entry and a composed
transfer's ``start`` / ``objective`` accept exactly the registered configs as soon as a method is
registered, also one defined outside pktransfer. The generic layers (pipeline, comparison, reports,
training, CLI) only talk to methods through :class:`pktransfer.methods.base.Method`'s hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pktransfer import config as configs

if TYPE_CHECKING:
    from pktransfer.config import MethodConfig
    from pktransfer.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def method_name(cls: type[Method]) -> str:
    return configs.config_name(cls.config_class)


def roles(cls: type[Method]) -> frozenset[str]:
    """What the method can be in a composed transfer: "start", "objective", both or neither."""
    return frozenset(r for r, yes in (("start", cls.is_start), ("objective", cls.is_objective)) if yes)


def register(cls: type[Method]) -> type[Method]:
    """Add a method; a second method under the same name is refused."""
    name = method_name(cls)
    if name in _METHODS:
        raise ValueError(f"a method named '{name}' is already registered ({_METHODS[name].__name__})")
    cls.name = name
    _METHODS[name] = cls
    configs.register_config(cls.config_class, roles(cls))
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    _METHODS.pop(name, None)
    configs.unregister_config(name)


def names() -> list[str]:
    return list(_METHODS)


def method_class(name: str) -> type[Method]:
    return _METHODS[name]


def classes() -> list[type[Method]]:
    return list(_METHODS.values())


def create(config: MethodConfig) -> Method:
    return _METHODS[config.name](config)
