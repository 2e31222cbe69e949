import sys

from ncpipe.cli import main

sys.exit(main())
