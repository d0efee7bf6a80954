"""Pure tensor math (no I/O, no models): selection strategies, sensitivity accumulation, SVD init."""
