import sys

from pmon2.daemon.main import main

sys.exit(main())
