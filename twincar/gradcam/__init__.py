"""Grad-CAM explanations over a Predictor (:class:`~twincar.gradcam.explainer.Explainer`)."""
