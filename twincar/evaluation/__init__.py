"""Evaluation: the loop over labelled images, metrics, temperature and threshold fitting, open-set metrics,
the neighbour index, error analysis and the figures."""
