"""asyncio drivers around the sans-I/O core: thin pumps, no protocol decisions."""
