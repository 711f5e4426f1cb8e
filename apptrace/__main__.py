import sys

from apptrace.cli import main

sys.exit(main())
