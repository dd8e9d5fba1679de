"""File formats read and written without a framework: safetensors, npz, Orbax folders, torch
pickles (read with torch only when asked), memory-mapped reads and direct writes."""
