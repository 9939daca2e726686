import sys

from supergen.cli import main

sys.exit(main())
