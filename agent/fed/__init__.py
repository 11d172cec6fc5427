"""Federation: aggregation strategies (pure numpy), the aggregator service and the box's sync client.

The aggregation modules import no I/O, no torch and no MQTT, so the aggregator and the box both use
them; each imports only those before it: ``lora_tensors`` (keys, ΔW, frozen A, upload checks),
``combines``, ``update_batch`` (validated batches, norms, clipping), ``low_rank`` (SVD), ``strategies``
(the strategies and their registry), ``partial_sums``.
"""
