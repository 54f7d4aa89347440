"""The README's test command runs every test file. pytest skips some folder names on its own (its default
`norecursedirs` holds `dist`, `build`, `*.egg`, ...): a test folder so named would silently drop out of CI, as
tests/dist once did. So: every tests/**/test_*.py must have given at least one collected test."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def test_every_test_file_is_collected(request):
    config = request.config
    whole = all(Path(a.split("::")[0]).resolve() == ROOT for a in config.args)
    if not whole or config.option.keyword or config.option.markexpr or config.option.deselect:
        pytest.skip("a part of the suite was asked for; this checks runs of the whole suite")
    files = {p.resolve() for p in ROOT.rglob("test_*.py")}
    collected = {Path(str(item.path)).resolve() for item in request.session.items}
    missing = sorted(str(p.relative_to(ROOT)) for p in files - collected)
    assert not missing, f"test files pytest did not collect (a folder pytest skips by name?): {missing}"
