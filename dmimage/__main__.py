import sys

from dmimage.cli.main import main

sys.exit(main())
