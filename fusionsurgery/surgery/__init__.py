"""Model surgery: choosing layers, planning and initialising the new tensors, writing the output."""
