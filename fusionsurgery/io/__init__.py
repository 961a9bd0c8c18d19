"""Reading and writing safetensors checkpoints without holding them in memory."""
