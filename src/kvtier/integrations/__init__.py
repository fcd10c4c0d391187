"""Adapters between kvtier's store and inference engines. The core never imports these."""
