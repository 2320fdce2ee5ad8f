"""Model families (adapters), loading any model source, and (later) the carved model classes."""
