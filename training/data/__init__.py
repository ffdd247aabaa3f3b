"""Training data: preprocessing into latent shards (`preprocess`) and streaming them (`dataset`)."""
