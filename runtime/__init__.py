"""steadysocket.runtime: asyncio adapters that carry out what steadysocket.model decides."""
