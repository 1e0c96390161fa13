"""What a run is given: model folders, hub ids and the demo model, checkpoint tensors, texts and
their tokenization, and the device and dtype asked for. Imports only :mod:`llmq.runtime.format`."""
