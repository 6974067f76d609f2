"""mnistlab: the prescribed MNIST CNN, its training, visualisation and adversarial examples."""

from .allocator import keep_freed_memory

__version__ = "1.0.0"

# Process-wide, once, on import: training and attacks on a CPU reuse their big tensor buffers
# instead of page-faulting fresh memory every step (see allocator.keep_freed_memory).
keep_freed_memory()
