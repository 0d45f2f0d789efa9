# Browser tier: Debian's Chromium driven by Playwright for Python. Never `playwright install`
# (it downloads its own browser, which fails here); the tests launch /usr/bin/chromium.
.PHONY: browser screenshots

CHROMIUM ?= /usr/bin/chromium

browser: venv
	@if [ ! -x $(CHROMIUM) ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; \
	fi
	@$(PY) -c "import playwright" 2>/dev/null || $(PIP) install -q "playwright>=1.45"

# Refresh docs/screenshots/*.png from a real balancer with simulated agents.
screenshots: browser
	PADDLER_SCREENSHOT_DIR=$(CURDIR)/docs/screenshots $(PY) -m pytest -q -m browser tests/browser/test_screenshots.py

INSTALL_TARGETS += browser
