"""Stage 1: the BAH reader, media decoding, frozen encoders and the embedding cache they fill."""
