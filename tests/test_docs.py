"""The README is a user's guide whose links lead somewhere; measured results live under docs/."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _links(md: Path) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()) if "://" not in t]


def test_every_relative_link_in_readme_and_docs_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for target in _links(page):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_readme_starts_with_the_two_setup_commands_and_links_results_and_methods():
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and "pkt run recipes/quickstart.yaml" in block[0] and block[1].endswith("pytest")
    for doc in ("docs/results.md", "docs/methods/seeking.md", "docs/methods/semalign.md", "docs/methods/laten.md"):
        assert f"]({doc})" in text, doc
