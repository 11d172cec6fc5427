"""Federation: aggregation strategies (pure numpy), the aggregator service and the box's sync client.

``agent.fed.strategies`` imports no I/O, no torch and no MQTT: the aggregator and the box both use it.
"""
