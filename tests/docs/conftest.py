"""The code blocks of README.md and docs/*.md, run by sybil (see snippets.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from .snippets import Page, Run, page_run


class Runs:
    """One :class:`Run` per page, started at its first block and closed after its last."""

    def __init__(self) -> None:
        self.open: dict[str, tuple[Run, contextlib.ExitStack]] = {}

    def get(self, page: Page) -> Run:
        if page.name not in self.open:
            stack = contextlib.ExitStack()
            run = stack.enter_context(page_run(page))
            self.open[page.name] = (run, stack)
        return self.open[page.name][0]

    def close(self, page: Page) -> None:
        entry = self.open.pop(page.name, None)
        if entry is not None:
            entry[1].close()

    def close_all(self) -> None:
        for name in list(self.open):
            self.open.pop(name)[1].close()


@pytest.fixture(scope="session")
def runs() -> Iterator[Runs]:
    all_runs = Runs()
    yield all_runs
    all_runs.close_all()
