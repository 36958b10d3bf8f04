"""Render a run's report in headless Chromium: a screenshot (PNG) and, optionally, the page's DOM.

    python scripts/render_report.py out/demo [--png out/demo/report/screenshot.png] [--height 3000] [--dom]

Uses Debian's ``chromium`` (``make chromium`` installs it when run as root). Offline: every
network feature Chromium would start on its own is switched off, and a throw-away profile is used.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str], profile: str, timeout: int) -> subprocess.CompletedProcess:
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (make chromium installs Debian's package as root)")
    cmd = [binary, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def screenshot(index: Path, png: Path, width: int = 1280, height: int = 3000, timeout: int = 120) -> Path:
    """A ``width`` x ``height`` screenshot of the page (the top of it, if it is longer)."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        _run([f"--screenshot={png}", f"--window-size={width},{height}", index.resolve().as_uri()], profile, timeout)
    return png


def dump_dom(index: Path, timeout: int = 120) -> str:
    """The page's DOM after Chromium has loaded it (what a browser shows, not the file's text)."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return _run(["--dump-dom", index.resolve().as_uri()], profile, timeout).stdout


def dom_counts(dom: str) -> dict[str, int]:
    """Galleries, thumbnails and figures in a dumped report DOM."""
    return {
        "galleries": dom.count('class="cluster gallery-block"'),
        "thumbnails": dom.count('<figure class="thumb'),
        "figures": dom.count('class="figure"'),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--png", type=Path, default=None, help="default: RUN_DIR/report/screenshot.png")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=3000)
    ap.add_argument("--dom", action="store_true", help="also print the DOM's gallery and figure counts")
    args = ap.parse_args(argv)
    index = args.run_dir / "report" / "index.html"
    if not index.is_file():
        print(f"{index} does not exist: run the job with output.report=true", file=sys.stderr)
        return 2
    png = args.png or index.parent / "screenshot.png"
    screenshot(index, png, args.width, args.height)
    print(f"screenshot: {png}")
    if args.dom:
        counts = dom_counts(dump_dom(index))
        print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
