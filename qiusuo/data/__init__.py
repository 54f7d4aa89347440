"""The data stage: text sources -> byte-level BPE tokenizer -> memory-mapped token shards -> batches."""
