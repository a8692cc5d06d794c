"""How long the explorer takes to draw a token's first heatmap (the 30 x 30 grid on SmolLM2), click to drawn.

Starts the explorer on the embedded model in this process, opens the page in headless Chromium (Debian's
``chromium`` and ``chromium-driver``), types the paper's prompt, clicks "CEO" and times until all 900
heatmap cells are drawn; also times the same work without the browser (the service alone), so the two
can be told apart. Run: ``.venv/bin/python benchmarks/explore.py`` (``make bench-explore``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import threading
import time
import warnings
from pathlib import Path

PROMPT = "Amazon's former CEO attended Oscars"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(app) -> str:
    import uvicorn

    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


def service_seconds(explorer, position: int, repeats: int) -> list[float]:
    from pyvene_patchscopes.explore.service import Query

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        explorer.grid(Query(PROMPT, position), lambda fraction: None)
        times.append(time.perf_counter() - start)
    return times


def browser_seconds(url: str, repeats: int) -> list[float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    times = []
    try:
        for _ in range(repeats):
            driver.get(url)
            WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "status").text == "ready")
            driver.find_element(By.ID, "tokenize").click()
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tokens .chip"))
            WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "status").text == "ready")
            chip = next(c for c in driver.find_elements(By.CSS_SELECTOR, "#tokens .chip") if c.text.strip() == "CEO")
            start = time.perf_counter()
            chip.click()
            WebDriverWait(driver, 300, poll_frequency=0.02).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#heatmap td.ps-cell")) == 900
            )
            times.append(time.perf_counter() - start)
    finally:
        driver.quit()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/explore.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch

    from pyvene_patchscopes import load_model
    from pyvene_patchscopes.explore.app import create_app
    from pyvene_patchscopes.explore.service import Explorer

    explorer = Explorer(load_model("smollm2-135m"))
    position = next(t["index"] for t in explorer.tokens(PROMPT)["tokens"] if t["text"].strip() == "CEO")
    service = service_seconds(explorer, position, args.repeats)
    browser = browser_seconds(_serve(create_app(explorer)), args.repeats) if shutil.which("chromedriver") else []
    report = {
        "model": "smollm2-135m",
        "cells": 900,
        "threads": torch.get_num_threads(),
        "service_seconds": service,
        "click_to_drawn_seconds": browser,
        "median_service": statistics.median(service),
        "median_click_to_drawn": statistics.median(browser) if browser else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"first heatmap of 'CEO' on SmolLM2 (30 x 30 = 900 cells, {report['threads']} threads): service "
        f"{report['median_service']:.2f} s median of {args.repeats}; click to drawn in Chromium "
        + (f"{report['median_click_to_drawn']:.2f} s" if browser else "not measured (no chromedriver)")
    )


if __name__ == "__main__":
    main()
