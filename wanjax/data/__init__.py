"""Training data of the shipped mini model: deterministic procedural videos with captions (`procedural`)."""
