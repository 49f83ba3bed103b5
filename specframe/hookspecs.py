"""Hook specifications. Hooks are for discovery only: the decoding loop never calls them.

Every hook is handed a `register(name, factory)` callback. `factory` is called with the part's
options as keyword arguments and must return the part. All implementations are called (none is
`firstresult`); their return values are ignored. A plugin registers a drafter in three lines:

    @specframe.hookimpl
    def register_drafters(register):
        register("mine", MyDrafter)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

hookspec = pluggy.HookspecMarker("specframe")
hookimpl = pluggy.HookimplMarker("specframe")


@hookspec
def register_drafters(register: "Callable[[str, Callable[..., object]], None]") -> None:
    """Register drafters (see `specframe.interfaces.Drafter`) with `register(name, factory)`."""


@hookspec
def register_controllers(register: "Callable[[str, Callable[..., object]], None]") -> None:
    """Register controllers (see `specframe.interfaces.Controller`) with `register(name, factory)`."""


@hookspec
def register_verifiers(register: "Callable[[str, Callable[..., object]], None]") -> None:
    """Register verifiers (see `specframe.interfaces.Verifier`) with `register(name, factory)`."""
