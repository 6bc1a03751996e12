"""Every code block of README.md and docs/*.md runs (or says why not): see snippets.py."""

from __future__ import annotations

from unittest import SkipTest

import pytest

from .conftest import Runs
from .snippets import BLOCK_SETUP, PAGE_SETUP, PAGES, REWRITES, SKIPS, Page, is_block, parse

PARSED = [parse(path) for path in PAGES]
BLOCKS = [
    (page, index) for page in PARSED for index, example in enumerate(page.examples) if is_block(example)
]


def _id(block: tuple[Page, int]) -> str:
    page, index = block
    return f"{page.name}:{page.examples[index].line}"


@pytest.mark.parametrize("block", BLOCKS, ids=[_id(b) for b in BLOCKS])
def test_block(block: tuple[Page, int], runs: Runs) -> None:
    page, index = block
    run = runs.get(page)
    # The blocks before this one, in order (when this test runs alone, or a block
    # before it was deselected): their failures are their own tests' business.
    while run.done < index:
        try:
            page.examples[run.done].evaluate()
        except (Exception, SkipTest):
            run.failed.append(run.done)
        run.done += 1
    try:
        page.examples[index].evaluate()
    except SkipTest as skip:  # a skip marker in the page, or an entry of SKIPS
        pytest.skip(f"{_id(block)}: {skip}")
    finally:
        run.done = index + 1
        if not any(is_block(e) for e in page.examples[run.done :]):
            while run.done < len(page.examples):  # trailing directives
                run.done += 1
            runs.close(page)


def test_every_table_entry_still_matches_one_block() -> None:
    """A skip or setup entry of snippets.py that names no block any more is stale."""
    by_name = {page.name: page for page in PARSED}
    for page_name, text in [*SKIPS, *BLOCK_SETUP]:
        page = by_name[page_name]
        hits = [e for e in page.examples if is_block(e) and text in str(e.parsed)]
        assert len(hits) == 1, (page_name, text, len(hits))
    for page_name in PAGE_SETUP:
        assert page_name in by_name, page_name
    sources = "\n".join(str(e.parsed) for page in PARSED for e in page.examples if is_block(e))
    for text in REWRITES:
        assert text in sources, f"REWRITES entry {text!r} is used by no block"


def test_every_page_is_collected() -> None:
    names = {page.name for page in PARSED}
    assert "README.md" in names and "docs/quickstart.md" in names
    assert len(BLOCKS) > 20
