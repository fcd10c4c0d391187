"""Processes kvtier starts and stops: vLLM servers (``kvtier serve`` or plain vLLM) over HTTP,
as the benchmarks and ``kvtier pod`` run them."""
