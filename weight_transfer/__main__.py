import sys

from weight_transfer.cli import main

sys.exit(main())
