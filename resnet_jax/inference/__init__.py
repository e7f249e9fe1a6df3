"""Using trained weights: the predictor, Grad-CAM maps, how predictions are shown."""
