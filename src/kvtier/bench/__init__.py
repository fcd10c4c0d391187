"""The benchmarks behind ``kvtier bench``: what they start, send, time and print. Their
arguments and help live in ``kvtier.cli``; each ``run(args)`` here takes the parsed namespace."""
