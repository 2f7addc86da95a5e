"""The UI in a real browser: `dagster dev` on loopback, the R4T asset groups and the automation page opened
in headless Chromium, their names checked on the rendered pages, screenshots saved, the server stopped.

Skipped, with the reason, when chromium, chromedriver or selenium are missing (.ci/run installs the Debian
packages chromium and chromium-driver). The last screenshots are copied to /tmp/r4t-ui/ for a person to see."""

from __future__ import annotations

import importlib.util
import shutil
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_ui_check():
    spec = importlib.util.spec_from_file_location("ui_check", REPO / "scripts" / "ui_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ui = load_ui_check()


@pytest.fixture
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed (dev dependency)")
    if ui.browser_binaries() is None:
        pytest.skip("chromium and chromedriver not found (apt-get install chromium chromium-driver)")


def test_the_asset_graph_and_automation_show_in_a_real_browser(browser, tmp_path):
    port = ui.free_port()
    with ui.dagster_dev(tmp_path / "dagster_home", port) as url:
        texts = ui.capture_pages(url, tmp_path / "screenshots")
        server = f"{url}/server_info"
    for name, (_, expected) in ui.EXPECTED_PAGES.items():
        assert all(e in texts[name] for e in expected), (name, texts[name][:500])
        shot = tmp_path / "screenshots" / f"{name}.png"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    shutil.copytree(tmp_path / "screenshots", Path("/tmp/r4t-ui"), dirs_exist_ok=True)
    with pytest.raises(OSError):  # the server it started is gone
        urllib.request.urlopen(server, timeout=5)
