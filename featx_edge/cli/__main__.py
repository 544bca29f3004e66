import sys

from featx_edge.cli import main

sys.exit(main())
