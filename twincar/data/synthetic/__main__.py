"""``python -m twincar.data.synthetic``: generate the embedded dataset."""

import sys

from twincar.data.synthetic import main

sys.exit(main())
