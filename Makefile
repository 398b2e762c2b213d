# Deliverables (see docs/install.md). All built offline from this checkout and the dependencies
# installed in $(PYTHON)'s environment; results go to dist/, scratch files to build/.
PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
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

test-packaging:
	$(PYTHON) -m pytest -q tests/integration/test_packaging.py tests/unit/test_startup.py

clean:
	rm -rf build dist/pmon2.pyz dist/pmon2_*_all.deb dist/pmon2-*.noarch.rpm

# CLI start-up of dist/pmon2.pyz (run by /usr/bin/python3) against .venv/bin/pmon2: median of 20 `version` runs
bench-startup: pyz
	$(PYTHON) tools/startup_time.py --runs 20
