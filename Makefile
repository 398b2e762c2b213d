# Deliverables (see docs/install.md): dist/pmon2.pyz, the .deb and the .rpm. A fresh clone needs only python3 >= 3.11
# with its venv module (Debian/Ubuntu: python3-venv), and dpkg-deb / rpmbuild for the packages. tools/build.py
# fetches pmon2's pure-Python dependencies itself, once, into a private venv (.build/venv, made with
# $(PYTHON) -m venv; never the system Python) and stages in .build/stage. build/ stays setuptools' own, so
# `pip install .` works before and after any of these. Results go to dist/.
PYTHON ?= python3
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/pmon2/__init__.py)
BUILD := $(PYTHON) tools/build.py

.PHONY: all pyz deb rpm packages test-packaging bench-startup clean

all:
	$(BUILD) pyz deb rpm

# dist/pmon2.pyz: one file, runs with any python3 >= 3.11 (`python3 pmon2.pyz ...`, or as pmond via a symlink)
pyz:
	$(BUILD) pyz

# dist/pmon2_$(VERSION)_all.deb (needs dpkg-deb)
deb:
	$(BUILD) deb

# dist/pmon2-$(VERSION)-1.noarch.rpm (needs rpmbuild: apt-get install rpm, or dnf install rpm-build)
rpm:
	$(BUILD) rpm

packages:
	$(BUILD) deb rpm

# The packaging tests run in the development venv of the README's test command (.venv, with pytest).
test-packaging:
	.venv/bin/python -m pytest -q tests/integration/test_packaging.py tests/unit/test_startup.py

# Also removes the build environment (.build/venv): the next build fetches the dependencies again.
clean:
	rm -rf .build build dist/pmon2.pyz dist/pmon2_*_all.deb dist/pmon2-*.noarch.rpm

# CLI start-up of dist/pmon2.pyz (run by /usr/bin/python3) against .venv/bin/pmon2: median of 20 `version` runs
bench-startup: pyz
	$(PYTHON) tools/startup_time.py --runs 20
