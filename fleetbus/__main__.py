import sys

from fleetbus.cli import main

sys.exit(main())
