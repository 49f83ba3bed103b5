"""Validators for the controllers' options: a bad value fails where it enters, naming the option."""

from __future__ import annotations

import math

from specframe.errors import ConfigError


def int_in(low: int, high: int):
    def check(instance, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"option {attribute.name!r} must be an integer in [{low}, {high}], got {value!r}")
    return check


def number_in(low: float, high: float, low_open: bool = False):
    def check(instance, attribute, value) -> None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (low < value if low_open else low <= value) or not value <= high:
            bracket = "(" if low_open else "["
            raise ConfigError(f"option {attribute.name!r} must be a number in {bracket}{low}, {high}], got {value!r}")
    return check


def is_bool(instance, attribute, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"option {attribute.name!r} must be true or false, got {value!r}")


def one_of(choices: tuple[str, ...]):
    def check(instance, attribute, value) -> None:
        if value not in choices:
            raise ConfigError(f"option {attribute.name!r} must be one of {', '.join(choices)}, got {value!r}")
    return check


def parse_costs(value) -> tuple[float, ...]:
    """A sequence of numbers (or '1,1.15,1.23' when the class is built directly) -> a tuple of floats.

    Options from the command line arrive already converted: specframe.plugins reads tuple[float, ...]."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(float(item) for item in items)
    except (TypeError, ValueError):
        raise ConfigError(
            f"option 'verify_costs' must be numbers separated by commas, e.g. 1,1.15,1.23; got {value!r}"
        ) from None


def positive_costs(instance, attribute, value) -> None:
    if not all(math.isfinite(c) and c > 0 for c in value):
        raise ConfigError(f"option {attribute.name!r} must be costs that are all finite and > 0 (or none, to "
                          f"learn them); got {value!r}")
