import sys

from skd.cli import main

sys.exit(main())
