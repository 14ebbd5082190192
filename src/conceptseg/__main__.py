import sys

from conceptseg.cli import main

sys.exit(main())
