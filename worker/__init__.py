"""The producing side: the arq worker, graph registry, emitter and publisher."""
