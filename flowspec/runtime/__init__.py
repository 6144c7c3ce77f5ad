"""asyncio networking: protocol, transport, nodes."""
