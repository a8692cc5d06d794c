"""A real browser for the tests: Debian's headless Chromium and chromedriver, driven by Selenium.

Nothing is downloaded at test time. The driver is named by its path, so Selenium Manager (which would fetch a
browser) has no reason to run, and inside the fixture it is switched off and refused outright. Where the
Debian packages are missing, every browser test fails with one line that names them (``make test`` installs
them as root). Helpers: `offline` cuts the page's network and `requests_made` lists what the page asked for,
`serve` runs a FastAPI app on a free 127.0.0.1 port, `screenshot` keeps a PNG of each page state.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

PACKAGES = "chromium chromium-driver"
MISSING = (
    f"the browser tests need Debian's headless Chromium: apt-get install {PACKAGES} (make test installs them as root)"
)
WINDOW = "1400,1000"


def chrome(download_dir: str | Path) -> Any:
    """A headless Chromium WebDriver that saves downloads into `download_dir` and logs the page's requests."""
    driver_path, browser_path = shutil.which("chromedriver"), shutil.which("chromium")
    if not driver_path or not browser_path:
        pytest.fail(MISSING, pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--window-size={WINDOW}",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        # names for the explorer's attack tests: another site, and a host name rebound to this machine
        "--host-resolver-rules=MAP attacker.example 127.0.0.1, MAP evil.example 127.0.0.1",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver


def _no_selenium_manager(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("Selenium Manager was asked for a browser; the tests use Debian's chromium only")


@pytest.fixture(scope="session")
def chromium(tmp_path_factory) -> Iterator[Any]:
    """One browser for the whole session (starting Chromium takes about a second)."""
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    downloads = tmp_path_factory.mktemp("downloads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        patch.setattr(SeleniumManager, "binary_paths", _no_selenium_manager)
        driver = chrome(downloads)
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture
def driver(chromium) -> Iterator[Any]:
    """The session's browser, back online, on a blank page, with its request log and downloads emptied."""
    online(chromium)
    chromium.get("about:blank")
    requests_made(chromium)
    for old in chromium.downloads.iterdir():
        old.unlink()
    yield chromium


# ---- the network ------------------------------------------------------------------------------------------
def offline(driver: Any) -> None:
    """Cut the page off the network: any request it makes fails (file:// pages still load)."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )


def online(driver: Any) -> None:
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )


def requests_made(driver: Any) -> list[str]:
    """The URLs the browser asked for since the last call (from its performance log, which this empties)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def resources_loaded(driver: Any) -> list[str]:
    """What the current page fetched besides itself (scripts, styles, images, fetch/XHR), by URL."""
    return driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")


# ---- waiting, looking, downloading --------------------------------------------------------------------
def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "the page", every: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # the DOM is being rebuilt under us: try again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(every)


def detached(element: Any) -> bool:
    """Whether the page has removed `element` (it was replaced by a newer one)."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    return False


def text_of(driver: Any, css: str) -> str:
    """The visible text of the first element matching `css` ('' when there is none)."""
    found = driver.find_elements("css selector", css)
    return found[0].text if found else ""


def hover(driver: Any, element: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(element).perform()


def tooltip_for(driver: Any, cell: Any, css: str = "div.ps-tooltip", timeout: float = 5.0) -> str:
    """Hover `cell` and return the text of the one tooltip it shows. The cell must stay where it was: a
    tooltip in the page's flow (its style sheet missing) would push the table under the pointer."""
    before = cell.rect
    hover(driver, cell)

    def shown() -> str:
        tips = [t for t in driver.find_elements("css selector", css) if t.is_displayed()]
        return tips[0].text if len(tips) == 1 and tips[0].text.strip() else ""

    text = wait_until(shown, timeout, f"one visible {css} on hover")
    moved = {k: round(cell.rect[k] - before[k]) for k in ("x", "y")}
    assert moved == {"x": 0, "y": 0}, (
        f"hovering moved the cell by {moved} px: the tooltip is in the page's flow "
        f"(is its position: fixed style loaded?)"
    )
    return text


def downloaded(folder: Path, name: str, timeout: float = 10.0) -> Path:
    """Wait for the browser to finish saving `folder/name`."""
    path = Path(folder) / name
    wait_until(
        lambda: path.is_file() and not list(Path(folder).glob("*.crdownload")), timeout, f"the download of {name}"
    )
    return path


def screenshot(driver: Any, name: str) -> Path:
    """Save the page as PNG under $PATCHSCOPES_SCREENSHOTS (default: a folder in the system's temp dir)."""
    folder = Path(os.environ.get("PATCHSCOPES_SCREENSHOTS") or Path(tempfile.gettempdir()) / "patchscopes-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot saved at {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return path


# ---- a server ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def serve(app: Any, timeout: float = 20.0) -> Iterator[str]:
    """Run the ASGI `app` with uvicorn on a free 127.0.0.1 port in a background thread; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout, f"uvicorn on port {port}")
        assert server.started, f"uvicorn did not start on 127.0.0.1:{port}"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
