"""Using a trained model: interleaved generation, scoring, image banks and their display."""
