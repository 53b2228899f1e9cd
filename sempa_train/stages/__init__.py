"""The pipeline's stages (prepare, sample, rank, train, evaluate) and the methods they are made of."""
