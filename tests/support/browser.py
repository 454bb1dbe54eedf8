"""Headless Chromium (Debian's `chromium` and `chromium-driver`, which scripts/setup.sh
installs) driven by Selenium, kept off the network: every host name fails to resolve, any
request that would still leave goes to a closed loopback port, and Chromium's background
services (updates, safe browsing, metrics) are off."""

from __future__ import annotations

import shutil

CLOSED_PORT_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there
OFFLINE_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    f"--proxy-server={CLOSED_PORT_PROXY}",
    "--window-size=1280,1600",
)


def chromium():
    """A Selenium driver for the system's headless Chromium, console logs on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        raise RuntimeError(
            "chromium and chromedriver are needed (scripts/setup.sh installs Debian's "
            "chromium and chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in OFFLINE_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))
