"""The ``FLASH_LLM_*`` environment switches, read alike everywhere (session 71): on / off words (1, true, yes, on /
0, false, no, off, any case), integers and finite numbers within bounds.  A value that is none of these warns,
naming the variable, and the default holds: until session 71 each module parsed its own, so "true" turned some
switches off and "off" left others on, and a bad number failed an import without naming the variable."""

from __future__ import annotations

import os
import warnings


def _warn(name: str, text: str, want: str, default) -> None:
    warnings.warn(f"{name}={text!r} is not {want}; using {default}", RuntimeWarning, stacklevel=3)


def _number(name: str, default, cast, least, most, what: str, means=None):
    """The number ``name`` read by ``cast`` (unset or empty: ``default``, which may be None); one that does not parse,
    is not finite or lies outside ``least .. most`` warns, naming it, and the default holds.  The warning names the
    default, or where that is None ``means``: the value the caller uses in its place (else "the default")."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        v = cast(text)
    except ValueError:
        v = None
    if (v is None or v != v or abs(v) == float("inf") or (least is not None and v < least)
            or (most is not None and v > most)):
        lo = "" if least is None else f" >= {least}"
        hi = "" if most is None else f" <= {most}"
        _warn(name, text, f"{what}{lo}{' and' if lo and hi else ''}{hi}",
              default if default is not None else "the default" if means is None else means)
        return default
    return v


def env_int(name: str, default: int | None, least: int | None = None, most: int | None = None, *,
            means: int | str | None = None) -> int | None:
    """The integer switch ``name`` (:func:`_number`).  ``means``: with ``default`` None (to tell unset from set), the
    value used where it is unset (or words for it), which a refused value's warning names (until session 87 it said
    "the default")."""
    return _number(name, default, int, least, most, "an integer", means)


def env_float(name: str, default: float | None, least: float | None = None,
              most: float | None = None, *, means: float | str | None = None) -> float | None:
    """The number ``name`` (:func:`_number`; ``means`` as for :func:`env_int`)."""
    return _number(name, default, float, least, most, "a finite number", means)


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The on / off switch ``name``: 1, true, yes, on / 0, false, no, off (any case); unset or empty: ``default``;
    anything else warns, naming it, and the default holds."""
    text = os.environ.get(name, "").strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
        return False
    if text:
        _warn(name, text, "one of 1, 0, true, false, yes, no, on, off", int(default))
    return default


def env_choice(name: str, default: str, choices: tuple[str, ...], on: str | None = None, off: str | None = None) -> str:
    """The word switch ``name``: one of ``choices`` (any case, stripped); the on / off words stand for ``on`` / ``off``
    where given; unset or empty: ``default``; anything else warns, naming it, and the default holds."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if text in choices:
        return text
    if on is not None and text in _ON:
        return on
    if off is not None and text in _OFF:
        return off
    _warn(name, text, f"one of {', '.join(choices)}" + (" or an on / off word" if on or off else ""), default)
    return default
