"""Data preparation: corpora -> SentencePiece tokenizer -> tokenized WebDataset shards."""
