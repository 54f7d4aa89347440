"""README.md and docs/*.md point only at what exists: every relative link and image names a file in the repository,
and every `#anchor` (on its own or after a page) names a heading of the page it points into, spelled as GitHub
spells heading anchors. Links inside code (fenced blocks, `inline code`) are text, not links, and web addresses
are not fetched. The README's two set-up commands stay first: `qiusuo demo`, then the tests."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """GitHub's anchor for each heading: lower case, punctuation dropped except - and _, spaces to -; a repeated
    heading gets -1, -2, ..."""
    out, seen = set(), {}
    for line in re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_anchor_spelling():
    assert anchors("## Training on several processes / machines\n## DeepSeek-V3.2\n## A\n## A\n") == {
        "training-on-several-processes--machines", "deepseek-v32", "a", "a-1"}
    assert anchors("### Speculative decoding with DeepSeek's MTP module") == {
        "speculative-decoding-with-deepseeks-mtp-module"}


def test_links_are_not_read_inside_code():
    assert LINK.findall(prose("[a](x.md) `[b](y.md)`\n```\n[c](z.md)\n```\n![d](e.png)")) == ["x.md", "e.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_image_exists(page):
    bad = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text(encoding="utf-8"))):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    readme = set(LINK.findall(prose((ROOT / "README.md").read_text(encoding="utf-8"))))
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in {t.partition("#")[0] for t in readme}]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_readme_opens_with_the_two_commands():
    """The first code block: the demo, then the test command (what a newcomer types first)."""
    block = re.search(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S | re.M).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].endswith("qiusuo demo") and lines[1].endswith("pytest -q"), lines
