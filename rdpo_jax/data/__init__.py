"""Records, ArrayRecord IO, tokenization, image preprocessing and the Grain pipeline."""
