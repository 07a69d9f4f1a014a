"""The continuous-batching runtime under every path (library, server, eval, demo).

By part: `sequence` (a request and its state), `pool` (slot pool sizing and the per-slot
decoding parameters on the device), `runner` (one model's cache behind one interface; the
compact forward's `kad.fast.runner.StaticRunner` and transformers' `TransformersRunner`),
`round` (one decoding round for a batch of mixed rules and parameters), `scheduler` (admission,
chunked prefill, decoding and release at every round boundary; `Session`).
"""
