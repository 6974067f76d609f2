"""The tooling around the teaching package: building the report and the submission, benchmarks,
the recipe search, the machine probe and the Colab links. Nothing in `mnistlab` imports it."""
