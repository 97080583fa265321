"""The old spelling of ``python -m twincar.synthetic``."""

import sys

sys.exit("python -m twincar.data.synthetic is now python -m twincar.synthetic")
