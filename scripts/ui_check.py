#!/usr/bin/env python
"""Look at the Dagster UI as a person would: start `dagster dev` on loopback, open the R4T asset groups'
lineage graphs and the automation page in headless Chromium (Debian's chromium + chromium-driver, driven
by selenium), check that the assets, the sensor and the schedule are shown, save a screenshot of each page,
and stop the server.

    .venv/bin/python scripts/ui_check.py --out /tmp/r4t-ui

The server gets a throwaway DAGSTER_HOME holding a copy of the repository's dagster.yaml, and the `smoke`
profile unless $R4T_PROFILE says otherwise. Exit status 0 when every expected asset name is shown.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCATION = "r4t_pipeline.definitions"  # the code location's name when dagster dev loads it with -m
# page name -> (path, texts the page must show). The asset groups' List tabs: a lineage graph renders only the
# nodes in its viewport, and with the MO-DiT branch beside them the first ones no longer fit in it. The list cuts
# long keys in the middle ("polyvore / oar ...sion_checkpoint"), so those assets are known by their descriptions.
EXPECTED_PAGES = {
    "polyvore": (f"/locations/{LOCATION}/asset-groups/polyvore/list",
                 ("catalog_source", "catalog", "item_embeddings", "embedding_index", "broad_queries", "folm_base")),
    "polyvore_oar": (f"/locations/{LOCATION}/asset-groups/polyvore_oar/list",
                     ("synthetic_targets", "Stage 1: the FOLM tuned by GRPO", "Stage 3: the EDM diffusion")),
    "modit": (f"/locations/{LOCATION}/asset-groups/modit/list",
              ("MO-DiT task polyvore_likes", "MO-DiT stage 1", "MO-DiT stage 4", "MO-DiT+HPPO against")),
    "automation": ("/automation", ("catalog_source_sensor", "weekly_retraining")),
}
# headless, and nothing that would reach outside this machine
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1600,1000")


def browser_binaries() -> tuple[str, str] | None:
    """(chromium, chromedriver) from the system packages, or None when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dagster dev exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1)
    raise TimeoutError(f"dagster dev did not answer {url}/server_info within {timeout:.0f} s:\n"
                       f"{log.read_text()[-3000:]}")


@contextlib.contextmanager
def dagster_dev(home: Path, port: int, timeout: float = 120) -> Iterator[str]:
    """`dagster dev` for the R4T code location on 127.0.0.1:port; stopped (SIGTERM, then SIGKILL to its
    process group) when the block exits, however it exits."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "R4T_PROFILE": os.environ.get("R4T_PROFILE", "smoke")}
    log = home / "dagster-dev.log"
    command = [str(Path(sys.executable).with_name("dagster")), "dev", "-m", "r4t_pipeline.definitions",
               "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        # its own session: the webserver, daemon and code server it starts share its process group
        server = subprocess.Popen(command, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, server, log, timeout)
        yield url
    finally:
        _stop(server)


def _stop(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)  # dagster dev, its webserver, daemon and code server
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)  # whatever of its group is still there
    server.wait()


def capture_pages(url: str, out_dir: Path, pages: dict[str, tuple[str, tuple[str, ...]]] = EXPECTED_PAGES,
                  timeout: float = 120) -> dict[str, str]:
    """Open each page, wait until every expected name is rendered, save `<out_dir>/<page name>.png`, and
    return each page's visible text. On a timeout the screenshot is still saved, for diagnosis."""
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    binaries = browser_binaries()
    if binaries is None:
        raise FileNotFoundError("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binaries[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {}
    with tempfile.TemporaryDirectory(prefix="r4t-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(executable_path=binaries[1]))

        def page_text() -> str:
            return driver.find_element(By.TAG_NAME, "body").text

        try:
            for name, (path, expected) in pages.items():
                page, screenshot = f"{url}{path}", out_dir / f"{name}.png"
                driver.get(page)
                try:
                    WebDriverWait(driver, timeout, poll_frequency=1).until(
                        lambda _, expected=expected: all(e in page_text() for e in expected))
                except TimeoutException:
                    driver.save_screenshot(str(screenshot))
                    missing = [e for e in expected if e not in page_text()]
                    raise AssertionError(f"{page} did not show {missing} within {timeout:.0f} s "
                                         f"(screenshot: {screenshot})") from None
                for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
                    button.click()  # the first visit's "Join the Dagster community" dialog
                with contextlib.suppress(TimeoutException):  # a nicer picture: statuses loaded, when they load soon
                    WebDriverWait(driver, 15, poll_frequency=1).until(lambda _: "Loading" not in page_text())
                time.sleep(1)  # let the graph finish its layout animation
                driver.save_screenshot(str(screenshot))
                texts[name] = page_text()
        finally:
            driver.quit()
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/r4t-ui"), help="folder for the screenshots")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the server and the page")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="r4t-dagster-home-") as home:
        with dagster_dev(Path(home), args.port or free_port(), args.timeout) as url:
            capture_pages(url, args.out, timeout=args.timeout)
    for name, (path, expected) in EXPECTED_PAGES.items():
        print(f"{path} shows {', '.join(expected)}: {args.out / name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
