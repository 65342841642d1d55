"""Strings from files (profile metadata, model names, paths) made safe to print through rich.

A profile is data anyone can edit: its model name may hold rich markup (`[/]` is a MarkupError, `[blink red]`
restyles the terminal) or raw control characters (ANSI escapes). `shown()` escapes markup and replaces every control
character with a visible `\\xNN`, so what reaches the terminal is exactly the text, inert.
"""

from __future__ import annotations

import re

from rich.markup import escape

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")     # C0 but tab and newline, DEL, C1
_CONTROL_ALL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def plain(value, newlines: bool = False) -> str:
    """`str(value)` with control characters shown as `\\xNN` (newlines and tabs kept only if `newlines`)."""
    pattern = _CONTROL if newlines else _CONTROL_ALL
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def shown(value, newlines: bool = False) -> str:
    """`plain(value)` with rich markup escaped: safe inside a string given to `Console.print`."""
    return escape(plain(value, newlines))
