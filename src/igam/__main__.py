import sys

from igam.cli import main

sys.exit(main())
