"""Data: formats → tokenized samples → resumable distributed batches."""
