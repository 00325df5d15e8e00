"""The README's support table is the one the capability rules generate."""
from pathlib import Path

from flash_ext import _support


def test_readme_support_table_is_generated():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert _support.support_table() in readme, (
        "README.md's support table is stale: run python -m flash_ext._support README.md")
    assert _support.readme_with_table(readme) == readme
