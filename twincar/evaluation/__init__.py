"""Evaluation: the loop over labelled images (``loop``), temperature and threshold fitting (``calibration``),
open-set metrics (``open_set``), the neighbour index (``neighbours``), error analysis (``interpret``), eval's
report files (``report``), the figures (``figures``), the sweep table (``ablation``) and the library side of the
eval, calibrate and index tools (``recipes``). The classification metrics themselves are
:mod:`twincar.models.metrics` (the classifier logs with them)."""
