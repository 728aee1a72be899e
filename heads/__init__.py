"""Stage 2: attention pooling, conflict-aware fusion and the heads, trained over the embedding cache."""
