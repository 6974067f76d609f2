"""mnistlab: the prescribed MNIST CNN, its training, visualisation and adversarial examples."""

__version__ = "1.0.0"
