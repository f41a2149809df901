"""The data pipeline, one job per module; `dataloader.py` is its public facade.

Imports only point down this list (no cycles): config, detokenizers, shakespeare, registry,
cache, options, text8, vocab, sources, processing, loaders, streaming, pipeline.
"""
