"""Tools around the training library (not imported by it): ``compare`` runs and tabulates recipes."""
