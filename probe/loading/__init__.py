"""What the commands load: the model zoo and checkpoints, data sets, text windows, Hugging Face
language models, training and the trained-model cache."""
