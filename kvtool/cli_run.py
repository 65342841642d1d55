"""`kvtool run` and `kvtool bench`: the runtime's commands, registered on the app of kvtool.cli."""

from __future__ import annotations
