"""Quantized base kernels: code books, blockwise 4/8-bit formats, double quantization, the node and the tree pass."""
