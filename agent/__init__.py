"""edgeopt.agent: the device agent (sources, windowing, batching, sinks, updates)."""
