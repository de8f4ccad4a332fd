import sys

from edgeclf.cli import main

sys.exit(main())
