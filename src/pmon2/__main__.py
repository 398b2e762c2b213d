import sys

from pmon2.cli import main

sys.exit(main())
