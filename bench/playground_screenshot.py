"""docs/playground.png: the playground page after a streamed completion, in headless Chromium.

    python bench/playground_screenshot.py RUN [--out docs/playground.png]

Starts ``slm serve RUN``, opens ``/`` with Playwright driving Debian's ``chromium`` (never
``playwright install``), types a prompt in completion mode, waits for the streamed text to finish
and saves a screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "playground.png"))
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--temperature", default="0.8")
    args = parser.parse_args()
    import httpx
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "slmkit.cli", "serve", args.run, "--port", str(port)])
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent.includes('parameters')")
            page.click("#mode-completion")
            page.fill("#max_tokens", str(args.max_tokens))
            page.fill("#temperature", args.temperature)
            page.fill("#seed", "1")
            page.fill("#prompt", args.prompt)
            page.click("#send")
            page.wait_for_function("document.getElementById('stats').textContent.includes('(')", timeout=60000)
            page.click("summary")
            page.screenshot(path=args.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
