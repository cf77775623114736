"""Every relative link and image in the repository's markdown points at a file that exists, so a
report copied into `results/` without its figures, or a moved doc, is caught before it ships."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def tracked_markdown() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "*.md"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    return [ROOT / name for name in out.split("\0") if name]


def dead_links(path: Path) -> list[str]:
    """Relative targets of `path`'s links and images (outside code blocks) that do not exist."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    dead = []
    for match in LINK.finditer(text):
        target = match.group(1).split("#", 1)[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue
        if not (path.parent / target).exists():
            dead.append(target)
    return dead


def test_dead_links_are_found(tmp_path: Path):
    (tmp_path / "here.png").write_bytes(b"")
    doc = tmp_path / "doc.md"
    doc.write_text("![a](here.png) ![b](figures/gone.png) [c](https://x.org/y) [d](#top)\n"
                   "[e](here.png#part)\n```\n![f](inside_code.png)\n```\n")
    assert dead_links(doc) == ["figures/gone.png"]


def test_repository_markdown_has_no_dead_links():
    files = tracked_markdown()
    assert len(files) > 20
    dead = {str(p.relative_to(ROOT)): d for p in files if (d := dead_links(p))}
    assert not dead, f"dead relative links: {dead}"
