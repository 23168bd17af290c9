"""Generated training and evaluation data (`shapes`: the default model's world)."""
