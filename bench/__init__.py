"""Benchmarks of the receiver: overhead per frame against a bare websockets floor, and
real-time capacity on one core. See bench/README.md."""
