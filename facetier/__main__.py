import sys

from facetier.cli import main

sys.exit(main())
