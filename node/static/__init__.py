"""The chat page served by the demo node."""
