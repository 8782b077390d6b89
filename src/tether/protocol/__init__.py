"""The sans-I/O core of tether: bytes and commands in, bytes, events and timers out.

Nothing in this package performs I/O, reads the clock or imports asyncio, socket,
ssl, time or threading (tests/protocol/test_layering.py enforces it). Time comes in
as ``now: float``; randomness can be injected for tests.
"""
