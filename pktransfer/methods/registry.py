"""The method registry: the one place that knows which methods exist.

``register(MethodClass)`` adds a method under the name its config class declares
(``name: Literal["seeking"]``) and refuses a name that is already taken. The recipe's ``method`` field
(and every comparison entry) accepts exactly the registered configs: the union is rebuilt whenever a
method is registered, so a method defined outside pktransfer works with ``pkt run`` and ``pkt compare``
as soon as it is registered. The generic layers (pipeline, comparison, reports, training, CLI) only talk
to methods through :class:`pktransfer.methods.base.Method`'s hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field

if TYPE_CHECKING:
    from pktransfer.config import MethodConfig
    from pktransfer.methods.base import Method

_METHODS: dict[str, type[Method]] = {}
_LISTENERS: list[Callable[[], None]] = []


def method_name(cls: type[Method]) -> str:
    default = cls.config_class.model_fields["name"].default
    if not isinstance(default, str) or not default:
        raise TypeError(f"{cls.__name__}.config_class must declare name: Literal['...'] = '...'")
    return default


def register(cls: type[Method]) -> type[Method]:
    """Add a method; a second method under the same name is refused."""
    name = method_name(cls)
    if name in _METHODS:
        raise ValueError(f"a method named '{name}' is already registered ({_METHODS[name].__name__})")
    cls.name = name
    _METHODS[name] = cls
    for listener in _LISTENERS:
        listener()
    return cls


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    _METHODS.pop(name, None)
    for listener in _LISTENERS:
        listener()


def on_change(listener: Callable[[], None]) -> None:
    _LISTENERS.append(listener)


def names() -> list[str]:
    return list(_METHODS)


def method_class(name: str) -> type[Method]:
    return _METHODS[name]


def classes() -> list[type[Method]]:
    return list(_METHODS.values())


def create(config: MethodConfig) -> Method:
    return _METHODS[config.name](config)


def config_union() -> Any:
    """The registered configs as one pydantic type, discriminated by ``name``."""
    configs = [cls.config_class for cls in _METHODS.values()]
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[tuple(configs)], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple of types)
