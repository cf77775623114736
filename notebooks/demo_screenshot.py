"""Screenshot of the demo after one click on its first example: docs/demo.png.

  python -m notebooks.demo_screenshot [--out docs/demo.png] [--export EXPORT_DIR]

Serves scripts/demo.py in-process, opens it in headless Chromium through Playwright, clicks
the first example (which loads it and runs both stages with the default controls), waits for
the refined image and saves the page. Needs requirements-screenshot.txt (Playwright's Python
client, no browser download) and a Chromium on the PATH (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
from pathlib import Path


from playwright.sync_api import sync_playwright

from models.export import DEFAULT_EXPORT, REPO_ROOT
from scripts.demo import CSS, build_demo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def screenshot(url: str, out: Path, browser_path: str, width: int, timeout_s: float) -> float:
    """Click the first example, wait for the refined image, save the page; returns the
    seconds from the click to the result."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(url, wait_until="networkidle")
        start = time.perf_counter()
        page.locator(".gallery-item, tbody tr").first.click()
        page.locator("#refined img").wait_for(state="visible", timeout=timeout_s * 1000)
        page.wait_for_timeout(1000)  # let images finish fading in
        seconds = time.perf_counter() - start
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "demo.png")
    p.add_argument("--export", type=Path, default=DEFAULT_EXPORT)
    p.add_argument("--browser", default=shutil.which("chromium"),
                   help="Chromium executable (default: chromium on the PATH)")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the result")
    args = p.parse_args(argv)
    if not args.browser:
        p.error("no chromium on the PATH: apt-get install chromium, or pass --browser")
    demo = build_demo(args.export)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                css=CSS)
    try:
        seconds = screenshot(f"http://127.0.0.1:{port}/", args.out, args.browser, args.width,
                             args.timeout)
    finally:
        demo.close()
    print(f"wrote {args.out} (example refined {seconds:.1f} s after the click)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
